"""Bucketed gradient reduction that overlaps the parameter backward, for any backend's Group.

Parameters are packed into buckets of about `bucket_bytes`, in reverse registration order (the
order their gradients appear in the backward). Once armed for a step, a post-accumulate-grad hook
counts each bucket's parameters; when a bucket is complete it is copied into its flat buffer
(allocated once, reused every step) and its asynchronous sum is launched, so communication
runs while the backward goes on. Buckets are launched strictly in index order on every rank, so
MPI and torch.distributed see the same collective sequence everywhere whatever the hook order.

Only `loss.backward()` accumulates into `.grad`: the force step (autograd.grad with
create_graph=True) never fires these hooks, and micro-batches before the last are not armed. A
pipeline step (parallel.pp > 1) arms none: its stages' backwards run micro-batch by micro-batch in
two phases each, so everything is reduced after them (comm.overlap has no effect there).
"""

from __future__ import annotations

import torch

from exaforce.comm.groups import Group, Handle


class _Bucket:
    def __init__(self, index: int, params: list[torch.nn.Parameter]):
        self.index = index
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.flat: torch.Tensor | None = None
        self.ready = 0
        self.handle: Handle | None = None


class GradReducer:
    """grad ← postscale · Σ_group grad for `params`, in overlapping buckets (see module docstring)."""

    def __init__(self, params: list[torch.nn.Parameter], group: Group, postscale: float, bucket_bytes: int,
                 overlap: bool = True, name: str = "grads"):
        self.group, self.postscale, self.name = group, postscale, name
        params = [p for p in params if p.requires_grad][::-1]
        self.buckets: list[_Bucket] = []
        current: list[torch.nn.Parameter] = []
        for p in params:
            current.append(p)
            if sum(q.numel() * q.element_size() for q in current) >= bucket_bytes:
                self.buckets.append(_Bucket(len(self.buckets), current))
                current = []
        if current:
            self.buckets.append(_Bucket(len(self.buckets), current))
        self._armed = False
        self._next = 0            # next bucket index to launch
        self.launches = 0         # reductions launched since construction (tests read this)
        self._hooks = [p.register_post_accumulate_grad_hook(lambda _p, i=index: self._on_grad(i))
                       for index, bucket in enumerate(self.buckets) for p in bucket.params] \
            if overlap and group.size > 1 else []

    def close(self) -> None:
        """Removes the hooks (its parameters move to another reducer)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def arm(self) -> None:
        """The next backward is the step's last: its hooks launch the reductions."""
        for bucket in self.buckets:
            bucket.ready, bucket.handle = 0, None
        self._next = 0
        self._armed = True

    def _on_grad(self, index: int) -> None:
        if not self._armed:
            return
        bucket = self.buckets[index]
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.flat is None:
            bucket.flat = torch.empty(bucket.numel, dtype=bucket.params[0].dtype, device=bucket.params[0].device)
        offset = 0
        for p in bucket.params:
            n = p.numel()
            if p.grad is None:  # unused on this rank's batch: still takes part, as zeros
                bucket.flat[offset:offset + n].zero_()
            else:
                bucket.flat[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        bucket.handle = self.group.allreduce_sum_async(bucket.flat, self.postscale, f"{self.name}.{bucket.index}")
        self.launches += 1

    def finish(self) -> None:
        """Launches what the backward did not (all of it without overlap), waits, writes the grads back."""
        if self.group.size == 1:  # nothing to exchange: scale in place, no buffers
            for bucket in self.buckets:
                for p in bucket.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif self.postscale != 1.0:
                        p.grad.mul_(self.postscale)
            self._armed = False
            return
        if not self._armed:
            self.arm()
        for bucket in self.buckets[self._next:]:
            self._launch(bucket)
        self._next = len(self.buckets)
        for bucket in self.buckets:
            bucket.handle.wait()
            offset = 0
            for p in bucket.params:
                n = p.numel()
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(bucket.flat[offset:offset + n].view_as(p))
                offset += n
        self._armed = False
