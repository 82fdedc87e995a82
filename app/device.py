"""Which device a rank computes on, and how batches get there.

One rank drives one device. The job templates bind each rank to its own GPU through the launcher
(`srun --gpus-per-task=1`, Aurora's ZE_AFFINITY_MASK), so a rank usually sees exactly one device
and takes index 0; where ranks see several (a bare `mpiexec` on a multi-GPU node) the rank's local
index on its node picks one (local_rank mod visible devices). The runtime applies the
visible-device variables (CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES,
ZE_AFFINITY_MASK) before torch counts devices, so the count here is already the rank's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

import torch

from exaforce.config import DEVICE_KINDS, ConfigError

VISIBLE_DEVICE_VARIABLES = {"cuda": ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"),
                            "xpu": ("ZE_AFFINITY_MASK",)}


class DeviceError(ConfigError):
    """The configured device is not there; the message says what the rank sees."""


def visible_devices(kind: str) -> int:
    """Devices of `kind` this process sees (0 when torch has no such backend)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "xpu":
        return torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    return 0


def device_index(local_rank: int, count: int) -> int:
    """The device a rank takes among the `count` it sees: index 0 when the launcher bound it to
    one, else its local rank modulo the count (ranks share devices when there are more ranks)."""
    if count < 1:
        raise ValueError(f"device_index: {count} visible devices")
    return 0 if count == 1 else local_rank % count


def choose_device(kind: str, local_rank: int = 0, count_of=visible_devices, environ=os.environ,
                  key: str = "run.device") -> torch.device:
    """run.device → this rank's torch.device. "auto": CUDA/ROCm if visible, else XPU, else the CPU.
    `key`: the setting's name in errors (`--device` on the command line)."""
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"{key} = {kind!r}: must be one of {', '.join(DEVICE_KINDS)}")
    if kind == "cpu":
        return torch.device("cpu")
    candidates = ("cuda", "xpu") if kind == "auto" else (kind,)
    for candidate in candidates:
        count = count_of(candidate)
        if count:
            return torch.device(candidate, device_index(local_rank, count))
    if kind == "auto":
        return torch.device("cpu")
    seen = ", ".join(f"{v}={environ[v]!r}" for v in VISIBLE_DEVICE_VARIABLES[kind] if v in environ) or \
        f"none of {', '.join(VISIBLE_DEVICE_VARIABLES[kind])} set"
    raise DeviceError(f"{key} = {kind!r}: this rank sees no {kind} device (torch {torch.__version__} "
                      f"{'has no ' + kind + ' support' if not _built_with(kind) else 'finds none'}; {seen})")


def rank_device(kind: str, topo, key: str = "run.device") -> torch.device:
    """Collective: this rank's device (`choose_device` from its place on its node). Every rank
    learns whether any failed, so all stop together with the first rank's reason."""
    try:
        device, problem = choose_device(kind, topo.local_rank, key=key), None
    except DeviceError as err:
        device, problem = None, str(err)
    seen = topo.allgather((problem, device.type if device is not None else None, topo.hostname))  # collective
    failed = [(rank, host, p) for rank, (p, _, host) in enumerate(seen) if p]
    if failed:
        rank, host, reason = failed[0]
        raise DeviceError(f"rank {rank} on {host}: {reason}"
                          + (f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""))
    if len({found for _, found, _ in seen}) > 1:  # "auto" where some nodes have GPUs: one backend cannot serve both
        where = ", ".join(f"rank {r}: {found}" for r, (_, found, _) in enumerate(seen))
        raise DeviceError(f"{key} = {kind!r}: the ranks found different devices ({where}); name one")
    return device


def _built_with(kind: str) -> bool:
    if kind == "cuda":
        return torch.backends.cuda.is_built() or torch.version.hip is not None
    return bool(getattr(torch._C, "_has_xpu", False))


def describe(device: torch.device) -> str:
    """The device's name for logs and the rank table."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "xpu":
        return f"{device} ({torch.xpu.get_device_name(device)})"
    return "cpu"


def device_peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes torch's caching allocator has handed out on an accelerator since the process
    started (0 on the CPU, whose peak is the process's: peak RSS, reported beside it)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xpu":
        return int(torch.xpu.max_memory_allocated(device))
    return 0


def to_device(batch, device: torch.device, dtype: torch.dtype):
    """A GraphBatch on `device` in `dtype` (floating fields). To an accelerator through pinned host
    memory and non-blocking copies, so the copy overlaps whatever the device is still doing; on the
    CPU the dtype conversion only (no copy when it is already right)."""
    if device.type == "cpu":
        return batch.to(device, dtype)
    return batch.to(device, dtype, pin=True)


@cache
def _libc(name: str, argtypes: tuple, restype):
    """A C library function (`malloc_trim`, `mallopt`), or None where the library has none (musl, macOS)."""
    library = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(library), name, None) if library else None
    if function is not None:
        function.argtypes, function.restype = list(argtypes), restype
    return function


def _malloc_trim():
    """glibc's malloc_trim, or None."""
    return _libc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEPT_MMAP_MAX, KEPT_TRIM_THRESHOLD = 0, 2**31 - 1  # the kept heap: no mmap, never trimmed
# The same settings for a process that is not ours to call mallopt in (glibc reads GLIBC_TUNABLES at
# start-up): `bench accuracy` gives its reference trainer the same heap as exaforce
KEPT_HEAP_TUNABLES = f"glibc.malloc.mmap_max={KEPT_MMAP_MAX}:glibc.malloc.trim_threshold={KEPT_TRIM_THRESHOLD}"


def keep_freed_host_memory() -> bool:
    """Have glibc keep the heap pages a CPU step frees for the next step's tensors; False where the
    C library is not glibc (nothing changed).

    Why: a step allocates and frees the same tensors every step, and by default glibc hands back to
    the OS every block over its mmap threshold and a freed heap top over its trim threshold; the
    kernel zero-fills those pages again when they are next touched (this VM: a fresh 6.5 MB tensor
    9 ms, a reused one 0.7 ms). Kept, the default model's step in `bench accuracy` ran 1.0–1.2×
    faster at the same peak (README). Blocks come from the heap only, and the heap is never trimmed
    on glibc's own initiative: where memory should go back (run.release_host_memory on the
    memory-saving path), release_freed_host_memory still trims it explicitly."""
    mallopt = _libc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, KEPT_MMAP_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD))


def release_freed_host_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim(0); a no-op elsewhere).

    Why: a CPU training step frees thousands of 17–52 MB tensors (bond-sized intermediates of
    recomputed units), and glibc serves tensors below its mmap threshold (which it raises to
    the largest it has freed, up to 32 MiB) from the heap, where freed pages stay resident: the
    peak RSS then holds about twice the live tensors. What it costs: returned pages are faulted in
    (zeroed by the kernel) again when reused (base preset, 8 dense cells: 0.69x the peak for 0.72x
    the atoms/s, README)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
