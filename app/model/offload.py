"""Expert offload: an MoE layer's experts live in host memory and run from a bounded device buffer.

Why: most of an MoE model's parameters (and their optimizer state) sit in experts, and a step routes
to a few of them (element routing: the plan says which before the forward). Janus keeps the idle ones
off the device. Here every expert's parameters, and so its AdamW state and gradient, stay on the host
(pinned on a GPU; exaforce.training.setup) and a layer's device buffer holds at most `budget`
experts at any time: the resident-expert budget.

How, exactly under force training's double backward:
- `ExpertBuffer.run(e, expert, x)` copies expert e's weights into the buffer (an LRU cache of
  `budget` experts; a hit moves nothing) and runs the expert on the copies. A copy enters the graph
  through `_Fetch`, whose backward hands the gradient to the host parameter (an identity, so every
  order of derivative passes through it).
- While a step's graphs are alive, saved-tensor hooks (`ExpertOffload.scope`) replace every saved
  reference to a copy by (expert, layout) and fetch the expert again when a backward needs it; no
  graph keeps a copy alive, so the forward, the force backward (create_graph) and the loss's
  backward each hold at most the buffer's experts.
- The host weights change only at the optimizer step; `step_done` empties the buffers then.
The numbers are those of resident experts: the same weights in the same ops (float64 tests:
tests/mpi/test_expert_placement.py). On a CPU-only machine the "device" copy is a separate buffer
in the same memory: the mechanism and its bookkeeping (bytes moved, peak resident bytes) are what
runs and is tested here.
- Prefetch: the routing plan gives each layer's rows per expert before the layer runs, so the layer
  asks its buffer for its first `budget` experts with rows before its dispatch all-to-all
  (`ExpertBuffer.prefetch`); on an accelerator their copies run on a side stream while the tokens
  travel, and an expert's first use waits for its copy's event. An expert beyond the budget, and
  every re-fetch in a backward, is fetched when it runs. The optimizer step of the offloaded experts
  runs on the host.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.multiprocessing.reductions import StorageWeakRef


class _Fetch(torch.autograd.Function):
    """The device copy of a host parameter as a differentiable function of it."""

    @staticmethod
    def forward(ctx, host: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.host_device = host.device
        return copy.detach()  # an alias of the buffer's copy: the graph records this node, not the buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.to(ctx.host_device), None


@dataclass
class _Copy:
    """A live device copy: which buffer, expert and parameter it holds, and a weak reference to its memory."""

    buffer: "ExpertBuffer"
    expert: int
    index: int
    storage: StorageWeakRef
    nbytes: int


class ExpertBuffer:
    """One MoE layer's device buffer: at most `budget` experts' weights, least recently used out first."""

    def __init__(self, offload: "ExpertOffload", budget: int):
        self.offload, self.budget = offload, budget
        self.cache: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self.hosts: dict[int, list[nn.Parameter]] = {}
        self.peak_bytes = 0
        self.expert_bytes = 0  # one expert's weights (the layer's experts are alike)
        self.pending: dict[int, object] = {}  # expert → the copy stream's event its copies wait for

    def prefetch(self, experts: list[tuple[int, nn.Module]]) -> None:
        """Start copying in the first `budget` of `experts` (this layer's experts with rows, in the
        order they will run), before the layer's dispatch."""
        for e, expert in experts[:self.budget]:
            self.hosts[e] = list(expert.parameters())
            if e not in self.cache:
                self._copy_in(e)

    def weights(self, e: int) -> list[torch.Tensor]:
        """Expert e's device copies (fetched if not resident)."""
        if e not in self.cache:
            self._copy_in(e)
        self.cache.move_to_end(e)
        copies = self.cache[e]
        ready = self.pending.pop(e, None)
        if ready is not None:  # a prefetched copy: the compute stream waits for it and owns it from now on
            stream = self.offload.device_module.current_stream()
            stream.wait_event(ready)
            for copy in copies:
                copy.record_stream(stream)
        return copies

    def _copy_in(self, e: int) -> None:
        """Expert e's weights into the buffer (least recently used out first), on the copy stream
        where there is one."""
        while len(self.cache) >= self.budget:
            self.pending.pop(self.cache.popitem(last=False)[0], None)
        stream = self.offload.copy_stream
        with torch.no_grad(), nullcontext() if stream is None else self.offload.device_module.stream(stream):
            copies = [p.detach().to(self.offload.device, copy=True, non_blocking=True) for p in self.hosts[e]]
        if stream is not None:
            self.pending[e] = stream.record_event()
        self.cache[e] = copies
        self.offload.register(self, e, copies)
        self.peak_bytes = max(self.peak_bytes, self.offload.resident_bytes(self))

    def run(self, e: int, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """expert(x) on the device copies of its weights. An expert without rows this step is not
        fetched: it runs on zero-stride stand-ins, so every rank still builds the same graph (the
        backward's all-to-alls keep one order on every rank)."""
        self.hosts[e] = list(expert.parameters())
        names = [name for name, _ in expert.named_parameters()]
        weights = self.weights(e) if len(x) else [x.new_zeros(()).expand(p.shape) for p in self.hosts[e]]
        copies = [_Fetch.apply(host, copy) for host, copy in zip(self.hosts[e], weights)]
        return functional_call(expert, dict(zip(names, copies)), (x,))


class ExpertOffload:
    """The model's expert buffers, the saved-tensor hooks that keep graphs off them, and the bytes moved."""

    def __init__(self, layers: list[nn.Module], budget: int, device: torch.device):
        if budget < 1:
            raise ValueError(f"parallel.resident_experts = {budget}: must be >= 1 (0 turns offload off)")
        self.device = device
        # accelerators: prefetched copies run on a stream of their own (ExpertBuffer.prefetch)
        self.device_module = torch.get_device_module(device) if device.type != "cpu" else None
        self.copy_stream = self.device_module.Stream() if self.device_module is not None else None
        self.buffers = [ExpertBuffer(self, budget) for _ in layers]
        for layer, buffer in zip(layers, self.buffers):
            layer.offload = buffer
            buffer.expert_bytes = layer.expert_numel * next(layer.shared.parameters()).element_size()
        self.copies: dict[int, _Copy] = {}   # storage address → the live copy there
        self.fetched_bytes = 0

    def register(self, buffer: ExpertBuffer, e: int, copies: list[torch.Tensor]) -> None:
        for i, copy in enumerate(copies):
            storage = copy.untyped_storage()
            self.copies[storage.data_ptr()] = _Copy(buffer, e, i, StorageWeakRef(storage), storage.nbytes())
            self.fetched_bytes += storage.nbytes()

    def resident_bytes(self, buffer: ExpertBuffer) -> int:
        """Bytes of `buffer`'s copies alive now (cached, or still referenced by a running op)."""
        self._forget_freed()
        return sum(c.nbytes for c in self.copies.values() if c.buffer is buffer)

    def _forget_freed(self) -> None:
        for address in [a for a, c in self.copies.items() if c.storage.expired()]:
            del self.copies[address]

    def _pack(self, tensor: torch.Tensor) -> object:
        copy = self.copies.get(tensor.untyped_storage().data_ptr()) if tensor.device.type == self.device.type else None
        if copy is None or copy.storage.expired():
            return tensor
        return copy, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()

    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        copy, shape, stride, offset = packed  # type: ignore[misc]
        with torch.no_grad():
            return copy.buffer.weights(copy.expert)[copy.index].as_strided(shape, stride, offset)

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Around a step's forward and both backwards: graphs save experts by name, not by copy."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def step_done(self) -> dict[str, float]:
        """After the optimizer step (host weights changed): empty the buffers; for the perf log this
        step's bytes fetched, the largest peak resident bytes of a layer and the largest in experts."""
        stats = {"offload_fetched_bytes": self.fetched_bytes,
                 "offload_peak_resident_bytes": max(b.peak_bytes for b in self.buffers),
                 "offload_peak_resident_experts": max(b.peak_bytes / max(b.expert_bytes, 1) for b in self.buffers)}
        for buffer in self.buffers:
            buffer.cache.clear()
            buffer.pending.clear()
            buffer.peak_bytes = 0
        self.fetched_bytes = 0
        self._forget_freed()
        return stats


def offload_experts(model: nn.Module, budget: int, device: torch.device) -> ExpertOffload:
    """Keep `model`'s experts on the host (pinned when `device` is an accelerator) with device
    buffers of `budget` experts per MoE layer; before the optimizer is made (its state follows the
    parameters to the host)."""
    if device.type != "cpu":
        for layer in model.moe_layers:
            layer.experts.to("cpu")
            for p in layer.experts.parameters():
                p.data = p.data.pin_memory()
    model.offload = ExpertOffload(model.moe_layers, budget, device)
    return model.offload
