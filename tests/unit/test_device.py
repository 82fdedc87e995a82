"""The device a rank trains on (exaforce.device), how batches get there, and how the perf log and the
report name it. This machine has no GPU: the accelerator cases run through `count_of` (how many
devices torch would report), which is the one input the choice takes from the runtime; the real
transfers and kernels are checked on a GPU by scripts/gpu-check.sh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exaforce.comm.groups import gpu_aware_mpi
from exaforce.config import Config, ConfigError, DataConfig, RunConfig, validate
from exaforce.device import DeviceError, choose_device, device_index, device_peak_memory_bytes, to_device
from exaforce.graph import build_batch
from exaforce.io.schema import Frames
from exaforce.perf.machines import MACHINES, device_machine, table_precision


def _counts(**kinds: int):
    return lambda kind: kinds.get(kind, 0)


def test_cpu_and_auto_without_accelerators_take_the_cpu():
    assert choose_device("cpu", count_of=_counts(cuda=4)) == torch.device("cpu")  # cpu means cpu
    assert choose_device("auto", count_of=_counts()) == torch.device("cpu")
    assert choose_device("auto") == torch.device("cpu")  # this machine, through torch itself


def test_auto_prefers_cuda_then_xpu():
    assert choose_device("auto", count_of=_counts(cuda=1, xpu=1)) == torch.device("cuda", 0)
    assert choose_device("auto", count_of=_counts(xpu=2), local_rank=1) == torch.device("xpu", 1)


def test_local_rank_picks_the_device_when_a_rank_sees_several():
    # A bare mpiexec on a node of 4 GPUs: ranks 0-3 take GPUs 0-3; 8 ranks share them two by two.
    assert [device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [device_index(r, 4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    chosen = [choose_device("cuda", r, count_of=_counts(cuda=4)) for r in range(4)]
    assert chosen == [torch.device("cuda", i) for i in range(4)]


def test_a_bound_rank_sees_one_device_and_takes_it():
    # What the job templates do (srun --gpus-per-task=1 sets CUDA/ROCR_VISIBLE_DEVICES per task,
    # Aurora's wrapper sets ZE_AFFINITY_MASK): every rank of the node sees one device, index 0.
    for local_rank in range(8):
        assert choose_device("cuda", local_rank, count_of=_counts(cuda=1)) == torch.device("cuda", 0)
    for local_rank in range(12):
        assert choose_device("xpu", local_rank, count_of=_counts(xpu=1)) == torch.device("xpu", 0)


def test_a_missing_device_is_a_clear_error_naming_the_visible_device_variables():
    with pytest.raises(DeviceError, match=r"run.device = 'cuda': this rank sees no cuda device.*"
                                          r"CUDA_VISIBLE_DEVICES='' *"):
        choose_device("cuda", count_of=_counts(), environ={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(DeviceError, match="ZE_AFFINITY_MASK"):
        choose_device("xpu", count_of=_counts(cuda=2), environ={})
    with pytest.raises(DeviceError, match="must be one of auto, cpu, cuda, xpu"):
        choose_device("gpu")


def test_config_validates_run_device():
    data = DataConfig(train=("x.bp",))
    assert validate(Config(run=RunConfig(device="cuda"), data=data)).run.device == "cuda"  # its presence: at start
    with pytest.raises(ConfigError, match=r"run.device = 'gpu': must be one of auto, cpu, cuda, xpu"):
        validate(Config(run=RunConfig(device="gpu"), data=data))


def _batch() -> object:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    atoms.get_potential_energy()
    species_of = np.full(119, -1)
    species_of[29] = 0
    return build_batch(Frames.from_atoms([atoms]), species_of, 5.0, 3.2)


def test_to_device_on_the_cpu_converts_the_dtype_and_copies_nothing_else():
    batch = _batch()
    same = to_device(batch, torch.device("cpu"), torch.float64)  # already float64 on the CPU: the same tensors
    assert same.positions_N3 is batch.positions_N3 and same.edge_index_2E is batch.edge_index_2E
    assert not same.positions_N3.is_pinned()  # pinning is for accelerators only
    single = to_device(batch, torch.device("cpu"), torch.float32)
    assert single.positions_N3.dtype == torch.float32 and single.edge_index_2E.dtype == torch.int64
    assert torch.equal(single.positions_N3, batch.positions_N3.float())
    assert single.route_counts_2C is batch.route_counts_2C  # host metadata stays


def test_the_cpu_has_no_device_peak():
    assert device_peak_memory_bytes(torch.device("cpu")) == 0


def test_gpu_aware_mpi_follows_the_library_switches():
    cray = "MPI VERSION    : CRAY MPICH version 8.1.28.2 (ANL base 3.4a2)"
    assert gpu_aware_mpi(cray, {"MPICH_GPU_SUPPORT_ENABLED": "1"})
    assert not gpu_aware_mpi(cray, {})
    assert gpu_aware_mpi("Open MPI v5.0.3", {"OMPI_MCA_opal_cuda_support": "true"})
    assert not gpu_aware_mpi("MPICH Version: 4.2.1", {"MPICH_GPU_SUPPORT_ENABLED": "1"})  # the wheel: host only


def test_the_perf_header_names_the_device_and_its_peak():
    cpu = device_machine(torch.device("cpu"), torch.float32)
    assert cpu["torch_device"] == "cpu" and cpu["name"] == "local-cpu" and cpu["peak_flops_per_s"] > 0
    h100 = MACHINES["h100"]
    assert table_precision(h100, torch.float64) == "fp64_matrix"
    assert table_precision(MACHINES["aurora"], torch.float64) == "fp64"  # no FP64 matrix engines
    assert table_precision(MACHINES["frontier"], torch.float32) == "fp32_matrix"
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert table_precision(h100, torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")  # TF32 allowed: the tensor cores' rate
        assert table_precision(h100, torch.float32) == "tf32_matrix"
    finally:
        torch.set_float32_matmul_precision(precision)


class _FakeTopology:
    """Two ranks' views for rank_device's agreement check (allgather returns both ranks' values)."""

    def __init__(self, other: tuple):
        self.local_rank, self.hostname, self.other = 0, "node0", other

    def allgather(self, mine: tuple) -> list:
        return [mine, self.other]


def test_ranks_must_agree_on_the_device_kind(monkeypatch):
    import exaforce.device as device_module
    from exaforce.device import rank_device

    assert rank_device("auto", _FakeTopology((None, "cpu", "node1"))) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"the ranks found different devices \(rank 0: cpu, rank 1: cuda\)"):
        rank_device("auto", _FakeTopology((None, "cuda", "node1")))  # node1 has a GPU, node0 not
    with pytest.raises(DeviceError, match=r"rank 1 on node1: no GPU there"):
        rank_device("auto", _FakeTopology(("no GPU there", None, "node1")))


def test_releasing_freed_host_memory_returns_freed_heap_pages_to_the_os():
    """In a fresh process whose mmap threshold is as high as glibc raises it (32 MiB), 8 MiB tensors
    come from the heap and their pages stay resident after they are freed, until
    release_freed_host_memory hands them back (the reason run.release_host_memory exists)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import ctypes, torch
        from exaforce.device import _malloc_trim, release_freed_host_memory
        if _malloc_trim() is None:
            print("skip"); raise SystemExit
        ctypes.CDLL(None).mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        def rss():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) >> 10
        big, keep = [], []
        for _ in range(48):  # 48 x 8 MiB, touched, each followed by a small survivor: no trim from the top
            big.append(torch.ones(2 << 20))
            keep.append(torch.ones(1 << 18))  # 1 MiB: no hole left by the imports is that large
        del big
        before = rss(); release_freed_host_memory(); after = rss()
        print(before - after)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    if out == "skip":
        pytest.skip("the C library has no malloc_trim (not glibc)")
    assert int(out) >= 300, f"only {out} MiB released of 384 freed"


@pytest.mark.parametrize("heap", ["glibc default", "mallopt", "GLIBC_TUNABLES"])
def test_a_kept_heap_reuses_freed_pages_instead_of_faulting_in_fresh_ones(heap):
    """run.keep_host_heap: once the heap has settled (this VM: within 1–5 reuses; ten are allowed), a
    48 MiB tensor allocated and freed ten more times faults in no fresh page (keep_freed_host_memory),
    instead of a whole block every time (glibc's default: a block over its mmap threshold is a fresh
    mapping that the kernel zero-fills page by page). KEPT_HEAP_TUNABLES gives a process started with
    it (bench accuracy's reference trainer) the same heap. Page faults, counted, not timed."""
    import os
    import subprocess
    import sys
    import textwrap

    from exaforce.device import KEPT_HEAP_TUNABLES

    script = textwrap.dedent(f"""
        import resource, torch
        from exaforce.device import keep_freed_host_memory
        if {heap == "mallopt"} and not keep_freed_host_memory():
            print("skip"); raise SystemExit
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):  # the heap settles
            torch.ones(12 << 20)  # 48 MiB, freed at once
        before = faults()
        for _ in range(10):
            torch.ones(12 << 20)
        print(faults() - before, resource.getpagesize())
    """)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if heap == "GLIBC_TUNABLES":
        env["GLIBC_TUNABLES"] = KEPT_HEAP_TUNABLES
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=env).stdout.strip()
    if out == "skip":
        pytest.skip("the C library is not glibc (no mallopt)")
    faults, page = map(int, out.split())
    block = (48 << 20) // page  # pages of one block
    if heap != "glibc default":
        assert faults <= block // 10, f"{faults} page faults in 10 reuses of a settled 48 MiB block"
    else:
        assert faults >= 8 * block, f"only {faults} page faults: glibc's default no longer maps large blocks afresh?"
