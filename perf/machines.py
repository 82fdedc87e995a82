"""Peak FLOP rates of one rank's device, with sources, and a measured peak for the local CPU.

One rank drives one device: a GCD on Frontier (an MI250X package holds two), a stack ("tile") on
Aurora (a Max 1550 holds two), a whole GPU on Perlmutter and on H100/H200 machines. Every peak
here is therefore *per rank*, so the machine peak of a job is world_size × peak.

Precision keys (FLOP/s, dense, no structured sparsity, boost clock):
  fp64, fp32         vector (SIMD / CUDA-core) rates
  fp64_matrix        matrix/tensor-core FP64 (MI250X matrix cores, NVIDIA DMMA)
  fp32_matrix        matrix cores on true FP32 inputs (MI250X only)
  tf32_matrix        tensor/XMX engines on TF32 inputs (what torch uses for fp32 matmuls when
                     `torch.backends.cuda.matmul.allow_tf32` / `set_float32_matmul_precision("high")`)
  bf16_matrix        tensor/matrix/XMX engines on BF16 inputs
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TERA = 1e12


@dataclass(frozen=True, slots=True)
class MachinePeak:
    """Peak FLOP/s of the device one rank drives, keyed by precision (see module docstring), and
    the size of the whole system, for full-machine projections of a scaling campaign."""

    name: str
    device: str
    peak_flops_per_s: dict[str, float]
    source: str
    ranks_per_node: int                 # one rank per device (GCD, stack, GPU)
    system_nodes: int | None = None     # compute nodes of the whole machine; None: no fixed system
    system_source: str = ""

    def peak(self, precision: str) -> float:
        if precision not in self.peak_flops_per_s:
            raise KeyError(f"machine {self.name!r} has no peak for precision {precision!r}; "
                           f"known: {sorted(self.peak_flops_per_s)}")
        return self.peak_flops_per_s[precision]


MACHINES: dict[str, MachinePeak] = {
    "frontier": MachinePeak(
        name="frontier",
        device="AMD Instinct MI250X, one GCD (half of the OAM package)",
        # The datasheet quotes the package (2 GCDs): FP64/FP32 vector 47.9, FP64/FP32 matrix 95.7,
        # BF16 383 TFLOP/s at 1.7 GHz. Halved per GCD.
        peak_flops_per_s={
            "fp64": 23.95 * TERA, "fp64_matrix": 47.85 * TERA,
            "fp32": 23.95 * TERA, "fp32_matrix": 47.85 * TERA,
            "bf16_matrix": 191.5 * TERA,
        },
        source="AMD Instinct MI250X datasheet (amd.com/en/products/accelerators/instinct/mi200/mi250x), "
               "package peaks / 2 per GCD, 1.7 GHz",
        ranks_per_node=8,  # 4 MI250X = 8 GCDs per node
        system_nodes=9408,
        system_source="OLCF Frontier User Guide (docs.olcf.ornl.gov/systems/frontier_user_guide.html): "
                      "9,408 compute nodes, 4 MI250X (8 GCDs) each",
    ),
    "aurora": MachinePeak(
        name="aurora",
        device="Intel Data Center GPU Max 1550, one stack (half of the GPU)",
        # Assumption, stated: Aurora's Max 1550 parts run 448 active vector engines (XVE, "EU") per
        # stack (56 Xe cores × 8; the full die has 512), 1.6 GHz. One XVE retires 16 FMA = 32 FLOP
        # per clock in FP32 and in FP64 (Intel quotes equal FP64 and FP32 vector peaks, 52.4 TFLOP/s
        # for 128 Xe cores). Hence 448 × 32 × 1.6e9 = 22.94 TFLOP/s. XMX: 2048 TF32 FLOP per Xe core
        # per clock (Intel: 419 TFLOP/s TF32 for 128 cores) → 56 × 2048 × 1.6e9 = 183.5; BF16 twice
        # that. The XMX engines have no FP64 mode. Top500's Aurora Rpeak uses other clocks/counts.
        peak_flops_per_s={
            "fp64": 22.94 * TERA, "fp32": 22.94 * TERA,
            "tf32_matrix": 183.5 * TERA, "bf16_matrix": 367.0 * TERA,
        },
        source="Intel Data Center GPU Max 1550 product specifications (ark.intel.com; 52.4 TFLOP/s "
               "FP64/FP32, 419 TF32, 839 BF16 for 128 Xe cores at 1.6 GHz) scaled to the 448 active "
               "EUs per stack of Aurora's parts (ALCF Aurora overview, docs.alcf.anl.gov)",
        ranks_per_node=12,  # 6 Max 1550 GPUs = 12 stacks per node
        system_nodes=10624,
        system_source="ALCF Aurora documentation (docs.alcf.anl.gov/aurora/): 10,624 nodes, "
                      "6 Intel Data Center GPU Max 1550 (12 stacks) each",
    ),
    "perlmutter": MachinePeak(
        name="perlmutter",
        device="NVIDIA A100-SXM4 40GB",
        peak_flops_per_s={
            "fp64": 9.7 * TERA, "fp64_matrix": 19.5 * TERA,
            "fp32": 19.5 * TERA, "tf32_matrix": 156.0 * TERA,
            "bf16_matrix": 312.0 * TERA,
        },
        source="NVIDIA A100 Tensor Core GPU datasheet (nvidia.com, 'A100 40GB SXM'), dense rates "
               "(TF32 312 and BF16 624 are with 2:4 sparsity)",
        ranks_per_node=4,  # 4 A100 per GPU node
        system_nodes=1792,
        system_source="NERSC Perlmutter architecture (docs.nersc.gov/systems/perlmutter/architecture/): "
                      "1,536 GPU nodes with A100 40GB + 256 with A100 80GB, 4 GPUs each",
    ),
    "h100": MachinePeak(
        name="h100",
        device="NVIDIA H100 SXM5 80GB",
        peak_flops_per_s={
            "fp64": 34.0 * TERA, "fp64_matrix": 67.0 * TERA,
            "fp32": 67.0 * TERA, "tf32_matrix": 494.7 * TERA,
            "bf16_matrix": 989.4 * TERA,
        },
        source="NVIDIA H100 Tensor Core GPU datasheet (nvidia.com, 'H100 SXM'), dense rates "
               "= half of the quoted with-sparsity 989 TF32 / 1979 BF16 TFLOP/s",
        ranks_per_node=8,  # an HGX/DGX H100 node; no fixed system size
    ),
    "h200": MachinePeak(
        name="h200",
        device="NVIDIA H200 SXM 141GB",
        peak_flops_per_s={
            "fp64": 34.0 * TERA, "fp64_matrix": 67.0 * TERA,
            "fp32": 67.0 * TERA, "tf32_matrix": 494.7 * TERA,
            "bf16_matrix": 989.4 * TERA,
        },
        source="NVIDIA H200 Tensor Core GPU datasheet (nvidia.com, 'H200 SXM'), dense rates "
               "= half of the quoted with-sparsity 989 TF32 / 1979 BF16 TFLOP/s (same die as H100)",
        ranks_per_node=8,  # an HGX H200 node; no fixed system size
    ),
}


def machine_record(name: str, precision: str) -> dict:
    """The perf header's `machine` field for a machine of the table at one precision."""
    if name not in MACHINES:
        raise KeyError(f"unknown machine {name!r}; known: {sorted(MACHINES)}")
    peak = MACHINES[name]
    return {"name": peak.name, "device": peak.device, "precision": precision,
            "peak_flops_per_s": peak.peak(precision), "peak_source": peak.source}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def measure_local_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 20,
                       threads: int | None = None, device: torch.device = torch.device("cpu")) -> float:
    """Best FLOP/s of `repeats` timed n×n matmuls on the local CPU: a peak is the best rate the
    hardware reaches (on a shared VM the median of five moved by ±25 % between runs, the best of
    twenty by about ±10 %).

    `threads` defaults to the torch thread count of the calling process: a rank's peak is what
    its own threads can do, so ranks sharing a node never count the same cores twice.

    One n×n @ n×n matmul is 2·n³ FLOPs (n³ multiply-adds), the count torch.utils.flop_counter uses.
    A vendor BLAS rarely beats its own large-matmul rate, so this is the practical peak.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size = {size}, repeats = {repeats}: both must be >= 1")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or threads_before)
    try:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        torch.matmul(a, b)  # warm-up: thread pool start, BLAS kernel selection
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if device.type != "cpu":
                torch.accelerator.synchronize(device)  # the kernel has run, not just been queued
            seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads_before)
    return 2.0 * size**3 / min(seconds)


# Which table entry a torch device name belongs to (torch.cuda/xpu.get_device_name).
DEVICE_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "perlmutter"), ("MI250X", "frontier"),
                ("Max 1550", "aurora"))


def table_precision(peak: MachinePeak, dtype: torch.dtype) -> str:
    """The precision key whose peak the training step's matmuls can reach: FP64 on matrix units
    where the device has them (cuBLAS/rocBLAS use them for DGEMM); FP32 on TF32 tensor cores only
    when torch is allowed to use them, else on FP32 matrix units (MI250X) or the vector units."""
    rates = peak.peak_flops_per_s
    if dtype == torch.float64:
        return "fp64_matrix" if "fp64_matrix" in rates else "fp64"
    if torch.get_float32_matmul_precision() != "highest" and "tf32_matrix" in rates:
        return "tf32_matrix"
    return "fp32_matrix" if "fp32_matrix" in rates else "fp32"


def device_machine(device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The perf header's `machine` field for the device that runs the step: the CPU measured
    (`local_machine`), an accelerator from the table by its name, or measured by a matmul on it when
    the table does not know it. `torch_device` says which device it was."""
    if device.type == "cpu":
        return {**local_machine(dtype), "torch_device": "cpu"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.xpu.get_device_name(device)
    for marker, key in DEVICE_NAMES:
        if marker.lower() in name.lower():
            return {**machine_record(key, table_precision(MACHINES[key], dtype)), "device": name,
                    "torch_device": str(device)}
    return {"name": f"local-{device.type}", "device": name, "torch_device": str(device),
            "peak_flops_per_s": measure_local_peak(dtype, size=8192, repeats=10, device=device),
            "peak_source": f"measured: torch.matmul n=8192 on {device}, best of 10 ({str(dtype).removeprefix('torch.')}; "
                           "not in exaforce.perf.machines)"}


def local_machine(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 20,
                  threads: int | None = None) -> dict:
    """The perf header's `machine` field for one rank on the local CPU, with a measured peak."""
    threads = threads or torch.get_num_threads()
    return {
        "name": "local-cpu",
        "device": _cpu_model(),
        "peak_flops_per_s": measure_local_peak(dtype, size, repeats, threads),
        "peak_source": f"measured: torch.matmul n={size}, best of {repeats} "
                       f"({str(dtype).removeprefix('torch.')}, {threads} thread(s) per rank)",
    }
