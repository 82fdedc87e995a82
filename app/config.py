"""Run configuration: one frozen dataclass tree, loaded from TOML and validated at load.

Every error names the dotted key (`model.cutoff = -1.0: must be > 0 Å`); unknown keys are errors,
so a misspelt option never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch


DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the names run.dtype and the calculator take
DEVICE_KINDS = ("auto", "cpu", "cuda", "xpu")  # run.device (exaforce.device); "cuda" also means ROCm
PP_SCHEDULES = ("folded", "gpipe")  # exaforce.parallel.pipeline_schedule
GP_HALOS = ("auto", "exchange", "ghost")  # exaforce.parallel.graph_parallel
BACKENDS = ("mpi", "horovod", "torch")  # comm.backend: exaforce.comm.groups implements each


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the dotted key and the file."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    out_dir: str = "runs/default"       # run folder: perf logs, checkpoints, report
    seed: int = 0
    dtype: str = "float32"              # float32 | float64
    device: str = "auto"                # auto | cpu | cuda | xpu: one device per rank (exaforce.device); auto:
                                        # the accelerator when one is visible, else the CPU; cuda covers ROCm
    recompute_lines: int = 4096         # training: both attentions are fused ops that store only their inputs and
                                        # sweep their lines in chunks of this many rows (memory: one chunk's
                                        # temporaries), the bond update is recomputed; 0: the plain autograd path
                                        # that stores every intermediate (the reference: far more memory)
    store_all_below: int = 2**23        # dense models: a micro-batch whose line graph is small (triplets × line width ×
                                        # blocks below this) runs the plain path anyway: fastest, and its memory is
                                        # modest (the default model, 4 dense cells per rank, 4.7M: 3.2 GiB peak,
                                        # 1.4x the atoms/s); 0: never. MoE models follow recompute_lines alone
    recompute_bonds: bool = True        # with recompute_lines > 0: recompute each block's line attention with its
                                        # bond update (least memory); false: store its sums (base preset, dense
                                        # cells: 11.9 instead of 7.1 MiB/atom, about 1.35x the atoms/s)
    release_host_memory: bool = True    # CPU, with recompute_lines > 0: after each recomputed unit and fused
                                        # attention pass frees its graph, hand the C heap's free pages back to the
                                        # OS (glibc malloc_trim). Without it freed pages stay resident and count in
                                        # the peak (base preset, 8 dense cells: 6.36 instead of 4.41 GiB, for
                                        # 1.4x the atoms/s: reused pages are faulted in again)
    keep_host_heap: bool = True         # CPU (glibc): tensors come from the heap only and glibc never trims it on its
                                        # own, so a step reuses the pages the last one freed instead of faulting in
                                        # fresh zeroed ones (exaforce.device.keep_freed_host_memory; release_host_memory
                                        # still trims explicitly where it applies)
    steps: int = 100                    # optimizer steps
    log_every: int = 10                 # rank 0 prints progress every N steps
    checkpoint_every: int = 0           # 0: only at the end
    final_checkpoint: bool = True       # false: no checkpoint at the end (benchmarks of huge models)
    keep_checkpoints: int = 3           # checkpoint folders kept (the newest); 0: all
    resume: str = ""                    # "": a new run; "latest": continue out_dir's newest complete checkpoint
                                        # (a new run if there is none); or a checkpoint folder (CLI: --resume)
    nonfinite: str = "stop"             # NaN/inf loss or gradient norm: "stop" (checkpoint of the last good
                                        # state, exit 3) or "skip" (no update for that step, counted)
    max_seconds: float = 0.0            # wall-time budget from the start of `train`, start-up included: stop at
                                        # the first step boundary past it, with the final checkpoint and model
                                        # file (exit 0); the lr schedule then runs over the budget as well
                                        # (progress: the larger of steps and time spent); 0: off
    step_timeout_s: float = 1800.0      # watchdog: abort the job when a step (with its validation and
                                        # checkpoint) makes no progress for this long; 0: off
    val_every: int = 0                  # validation MAE every N steps (0: at the end only), if any is held out
    calibration_cache: str = "auto"     # folder of cached start-up calibrations (exaforce.training.calibrate); auto:
                                        # $XDG_CACHE_HOME/exaforce/calibration (else ~/.cache/…); "": always calibrate
    tensorboard: bool = False           # rank 0 also writes metrics.csv's values as TensorBoard scalars to RUN/tensorboard
    init_from: str = ""                 # fine-tuning: start from this checkpoint (file or run folder); "": from scratch
    freeze: str = "none"                # with init_from: "none" trains all, "backbone" only readout + head embeddings


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetConfig:
    path: str                           # ADIOS2 BP5 dataset (DIR.bp), already staged
    head: str = ""                      # its energy head, one of model.heads ("": the first)
    weight: float = 1.0                 # expected visits of each structure per epoch (> 1 oversamples)
    val_fraction: float = 0.0           # share held out for validation (seeded choice)


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    train: tuple[str, ...] = ()         # shorthand: datasets with the first head, weight 1, no validation
    datasets: tuple[DatasetConfig, ...] = ()  # [[data.datasets]] tables: multi-fidelity training
    global_batch_size: int = 8          # structures per step over all ranks
    micro_batches: int = 1              # gradient accumulation: each rank's share in this many passes
    balance: bool = True                # deal each step's structures to ranks by predicted cost (else round-robin)
    sample_store: bool = False          # global shuffling through the MPI one-sided sample store
    stage_dir: str = ""                 # node-local copies made by `exaforce stage --to DIR`: read DIR/<name>.bp

    def listed(self) -> tuple[DatasetConfig, ...]:
        """The datasets as configured, at their shared-file-system paths (what `exaforce stage` copies)."""
        return self.datasets or tuple(DatasetConfig(path=p) for p in self.train)

    def sources(self, heads: tuple[str, ...]) -> tuple[DatasetConfig, ...]:
        """Every training dataset with its head resolved, read from stage_dir when it holds a copy
        (when staging failed, `exaforce stage --fallback` has warned and the shared path is read)."""
        def read_from(path: str) -> str:
            staged = Path(self.stage_dir) / Path(path).name
            return str(staged) if self.stage_dir and staged.exists() else path

        return tuple(DatasetConfig(path=read_from(d.path), head=d.head or heads[0], weight=d.weight,
                                   val_fraction=d.val_fraction) for d in self.listed())


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    elements: tuple[str, ...] = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
    heads: tuple[str, ...] = ("default",)  # energy heads, one per dataset/fidelity (data.datasets[].head)
    cutoff: float = 5.0                 # Å, atom graph
    three_body_cutoff: float = 3.2      # Å, line graph (bond pairs): the first shell of close-packed metals (the
                                        # second, at 3.5-4.1 Å, doubled the triplets); `bench accuracy`, 240 s:
                                        # force MAE 125 meV/Å against 272 at 6/4 Å (README)
    width: int = 64                     # channels D
    line_width: int = 16                # light block: most channels of the line graph's attention (bond pairs,
                                        # the most rows); 0: width. Fewer make every per-triplet op cheaper
                                        # (the default model's step 2x faster at 16: `bench accuracy`, README)
    blocks: int = 2                     # interaction blocks
    block: str = "light"                # light: exaforce's separable attention (no per-triplet state, fused
                                        # training path); matris: MatRIS's block with per-triplet features and
                                        # gated-MLP messages, cutoff-smooth (exaforce.model.matris_block)
    edge_mlp_ratio: int = 2             # hidden width of the bond update MLP / width (runs on E rows)
    node_mlp_ratio: int = 2             # hidden width of the atom update MLP / width (N rows: cheap)
    moe_experts: int = 0                # experts per MoE MLP; 0: dense MLPs
    moe_top_k: int = 1                  # experts per element (plus one always-on shared expert)
    radial_basis: int = 8               # Bessel functions
    angle_basis: int = 8                # Chebyshev polynomials of cos θ
    envelope_p: int = 6                 # smoothness exponent of the polynomial envelope
    density_sum: bool = True            # light block: the atom update also reads the plain envelope-weighted sum of its
                                        # bonds' features (a neighbour density, which the normalised attention averages
                                        # out; `bench accuracy`, seed 1, with line_width 16: forces 0.80x, README)

    @property
    def line_channels(self) -> int:
        """The channels of the line graph's attention: line_width, at most width (0: width)."""
        return min(self.line_width, self.width) if self.line_width else self.width

    @property
    def line_channels_per_triplet(self) -> int:
        """Channels a triplet carries over all blocks: a line graph's size in the units of
        run.store_all_below (triplets × this)."""
        return self.line_channels * self.blocks


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    energy_weight: float = 1.0          # on (eV/atom)²
    forces_weight: float = 100.0        # on (eV/Å)², mean over atoms of a structure (MACE's weight; 10 before:
                                        # with stress at 1, errors of a few GPa dominated the loss)
    forces_per_atoms: float = 0.0       # 0: forces term = mean over each structure's atoms (every structure counts
                                        # alike); N > 0: sum over its atoms / N (every atom counts alike, as in
                                        # MACE's loss; N about the data's mean atoms per structure keeps the weight;
                                        # `bench accuracy`, N = 65: forces 6 % better on seed 1, 11 % worse on 2)
    stress_weight: float = 0.01         # on (GPa)² (0.1 before: `bench accuracy`, three seeds, force MAE 8-10 % lower
                                        # at 0.01, stress MAE 1.1-1.8 instead of 0.4-0.8 GPa; 0.001: 5.2 GPa)
    moe_aux_weight: float = 0.01        # load-balancing loss X·Σ f·P per MoE layer (MoE models only)


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    amsgrad: bool = False               # AdamW's AMSGrad variant (MACE's default; `bench accuracy`, seed 1: no better)
    grad_clip: float = 10.0             # global gradient norm; 0 disables
    warmup_steps: int = 10
    lr_final: float = 0.1               # the cosine decay ends at lr_final · lr (`bench accuracy`, seed 1: 0.01 no better)
    ema_decay: float = 0.99             # exponential moving average of the weights, for validation, checkpoints
                                        # and model files (exaforce.training.ema); 0: off. `bench accuracy`,
                                        # 240 s: force MAE 225 meV/Å against 272 without (README)


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    dp: int = 0                         # data-parallel degree; 0: world_size / (pp · ep)
    ep: int = 1                         # expert-parallel degree
    pp: int = 1                         # pipeline ranks (contiguous interaction blocks per stage)
    pp_chunks: int = 1                  # stages per pipeline rank (interleaved: rank r runs stages r, r + pp, …):
                                        # less pipeline bubble (exaforce.parallel.pipeline_schedule), more transfers
    pp_split: tuple[int, ...] = ()      # blocks per stage (pp · pp_chunks counts); empty: as equal as possible
    pp_schedule: str = "folded"         # folded | gpipe (exaforce.parallel.pipeline_schedule)
    pp_alive: int = 0                   # folded: most micro-batches' worth of graphs per rank (counted per
                                        # stage); 0: chosen by simulation
    gp: int = 1                         # graph-parallel degree: ranks that split one share's structures by atoms
    gp_min_atoms: int = 512             # gp > 1: structures of at least this many atoms are split into spatial
                                        # domains over the GP group; smaller ones go whole to one GP rank
    replace_experts_every: int = 0      # ep > 1: every N steps the experts move to a placement balanced on the
                                        # load since the last (exaforce.parallel.placement); 0: fixed placement
    expert_replicas: int = 0            # with replace_experts_every: spare expert slots per EP rank and MoE layer,
                                        # filled with replicas of the busiest experts (they share their rows)
    resident_experts: int = 0           # MoE: experts (weights, gradients, optimizer state) stay in host memory and
                                        # at most this many per layer are on the device at a time; 0: all resident
    gp_halo: str = "auto"               # exchange: one hop of halo, refreshed from its owners twice per block
                                        # (light block only); ghost: each rank computes its halo out to the
                                        # receptive field, no collective in the model; auto: exchange for the
                                        # light block, ghost for matris (README: Graph parallelism, measured)


@dataclass(frozen=True, kw_only=True, slots=True)
class CommConfig:
    backend: str = "mpi"                # mpi | horovod | torch (torch.distributed: gloo on CPU)
    bucket_mb: float = 25.0             # gradient buckets, reduced while the backward goes on
    overlap: bool = True                # launch buckets from the backward; false: all after it
    sync_before_reduce: bool = False    # benchmarks: a world barrier first, so "comm" excludes load imbalance


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named model sizes. `[model] preset = "base"` starts from one; keys beside it override. The presets
# keep MatRIS's cutoffs (6 Å, 4 Å), full-width line graphs and no density input, which the benchmarks
# and tests of each were measured with.
PRESET_GRAPH = {"cutoff": 6.0, "three_body_cutoff": 4.0, "line_width": 0, "density_sum": False}
MODEL_PRESETS: dict[str, ModelConfig] = {
    "small": ModelConfig(width=16, blocks=2, **PRESET_GRAPH),                 # unit tests
    "demo": ModelConfig(width=32, blocks=2, **PRESET_GRAPH),                  # the bundled demo, minutes on a laptop
    "small-moe": ModelConfig(width=16, blocks=2, moe_experts=4, moe_top_k=2, **PRESET_GRAPH),  # MoE unit tests
    # MatRIS-10M-like (10.4M): capacity sits in the atom MLPs, which see ~60× fewer rows than bonds.
    "base": ModelConfig(width=128, blocks=10, edge_mlp_ratio=2, node_mlp_ratio=4, **PRESET_GRAPH),
    # MoE sizes: experts scale the atom-update MLPs (N rows, cheap per parameter); bond experts stay
    # narrow because bonds are ~60× more rows and pass the double backward. Counts: `model info`.
    "moe-100m": ModelConfig(width=128, blocks=4, edge_mlp_ratio=2, node_mlp_ratio=11, moe_experts=16, moe_top_k=2,
                            **PRESET_GRAPH),
    "moe-1b": ModelConfig(width=128, blocks=4, edge_mlp_ratio=2, node_mlp_ratio=32, moe_experts=64, moe_top_k=2,
                          **PRESET_GRAPH),
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset = {name!r}: unknown (known: {', '.join(MODEL_PRESETS)})")
    return MODEL_PRESETS[name]


def _positive(value: float, key: str, unit: str = "") -> None:
    if not value > 0:
        raise ConfigError(f"{key} = {value!r}: must be > 0{' ' + unit if unit else ''}")


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express; raises ConfigError naming the key."""
    from ase.data import atomic_numbers

    if cfg.run.dtype not in DTYPES:
        raise ConfigError(f"run.dtype = {cfg.run.dtype!r}: must be 'float32' or 'float64'")
    if cfg.run.device not in DEVICE_KINDS:
        raise ConfigError(f"run.device = {cfg.run.device!r}: must be one of {', '.join(DEVICE_KINDS)}")
    _positive(cfg.run.steps, "run.steps")
    _positive(cfg.run.log_every, "run.log_every")
    if cfg.run.recompute_lines < 0:
        raise ConfigError(f"run.recompute_lines = {cfg.run.recompute_lines}: must be >= 0 (0: store every intermediate)")
    if cfg.model.block not in ("light", "matris"):
        raise ConfigError(f"model.block = {cfg.model.block!r}: must be 'light' or 'matris'")
    if cfg.model.block == "matris" and cfg.model.moe_experts:
        raise ConfigError("model.block = 'matris' has dense MLPs only: set model.moe_experts = 0")
    if cfg.run.store_all_below < 0:
        raise ConfigError(f"run.store_all_below = {cfg.run.store_all_below}: must be >= 0 (0: never)")
    if cfg.run.val_every < 0:
        raise ConfigError(f"run.val_every = {cfg.run.val_every}: must be >= 0")
    if cfg.run.checkpoint_every < 0:
        raise ConfigError(f"run.checkpoint_every = {cfg.run.checkpoint_every}: must be >= 0")
    if cfg.run.keep_checkpoints < 0:
        raise ConfigError(f"run.keep_checkpoints = {cfg.run.keep_checkpoints}: must be >= 0 (0 keeps all)")
    if cfg.run.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"run.nonfinite = {cfg.run.nonfinite!r}: must be 'stop' or 'skip'")
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard = true: the tensorboard package is not installed (it is pinned in "
                          "envs/local/requirements.txt; `pip install tensorboard` into this environment)")
    if not cfg.run.max_seconds >= 0:
        raise ConfigError(f"run.max_seconds = {cfg.run.max_seconds}: must be >= 0 (0: no time budget)")
    if not cfg.run.step_timeout_s >= 0:
        raise ConfigError(f"run.step_timeout_s = {cfg.run.step_timeout_s}: must be >= 0 (0: no watchdog)")
    if cfg.run.freeze not in ("none", "backbone") or (cfg.run.freeze != "none" and not cfg.run.init_from):
        raise ConfigError(f"run.freeze = {cfg.run.freeze!r}: must be 'none' or 'backbone' (the latter with run.init_from)")
    if bool(cfg.data.train) == bool(cfg.data.datasets):
        raise ConfigError("data: give the training datasets either as data.train (paths) or as [[data.datasets]] tables")
    for i, d in enumerate(cfg.data.datasets):
        if d.head and d.head not in cfg.model.heads:
            raise ConfigError(f"data.datasets[{i}].head = {d.head!r}: not in model.heads {list(cfg.model.heads)}")
        _positive(d.weight, f"data.datasets[{i}].weight")
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError(f"data.datasets[{i}].val_fraction = {d.val_fraction}: must be in [0, 1)")
    _positive(cfg.data.global_batch_size, "data.global_batch_size")
    unknown = [e for e in cfg.model.elements if e not in atomic_numbers]
    if unknown or not cfg.model.elements:
        raise ConfigError(f"model.elements = {list(cfg.model.elements)}: unknown element(s) {unknown}")
    if not cfg.model.heads or len(set(cfg.model.heads)) != len(cfg.model.heads):
        raise ConfigError(f"model.heads = {list(cfg.model.heads)}: need one or more distinct names")
    _positive(cfg.model.cutoff, "model.cutoff", "Å")
    _positive(cfg.model.three_body_cutoff, "model.three_body_cutoff", "Å")
    if cfg.model.three_body_cutoff > cfg.model.cutoff:
        raise ConfigError(f"model.three_body_cutoff = {cfg.model.three_body_cutoff}: must be <= model.cutoff "
                          f"({cfg.model.cutoff} Å)")
    for key in ("width", "blocks", "edge_mlp_ratio", "node_mlp_ratio", "radial_basis", "angle_basis", "envelope_p"):
        _positive(getattr(cfg.model, key), f"model.{key}")
    if cfg.model.line_width < 0:
        raise ConfigError(f"model.line_width = {cfg.model.line_width}: must be >= 0 (0: model.width)")
    if cfg.model.moe_experts < 0 or (cfg.model.moe_experts and not 1 <= cfg.model.moe_top_k <= cfg.model.moe_experts):
        raise ConfigError(f"model.moe_experts = {cfg.model.moe_experts}, model.moe_top_k = {cfg.model.moe_top_k}: "
                          "need moe_experts >= 0 and 1 <= moe_top_k <= moe_experts")
    for key in ("energy_weight", "forces_weight", "forces_per_atoms", "stress_weight", "moe_aux_weight"):
        if getattr(cfg.loss, key) < 0:
            raise ConfigError(f"loss.{key} = {getattr(cfg.loss, key)}: must be >= 0")
    _positive(cfg.optim.lr, "optim.lr")
    if not 0.0 <= cfg.optim.lr_final <= 1.0:
        raise ConfigError(f"optim.lr_final = {cfg.optim.lr_final}: must be in [0, 1] (a fraction of optim.lr)")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay = {cfg.optim.ema_decay}: must be in [0, 1) (0: no averaging)")
    if cfg.optim.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip = {cfg.optim.grad_clip}: must be >= 0 (0 disables)")
    if cfg.parallel.dp < 0 or cfg.parallel.ep < 1:
        raise ConfigError(f"parallel.dp = {cfg.parallel.dp}, parallel.ep = {cfg.parallel.ep}: need dp >= 0, ep >= 1")
    ep, experts = cfg.parallel.ep, cfg.model.moe_experts
    if ep > 1 and not experts:
        raise ConfigError(f"parallel.ep = {ep}: expert parallelism needs an MoE model (model.moe_experts > 0)")
    if ep > 1 and (ep > experts or experts % ep):
        raise ConfigError(f"parallel.ep = {ep}, model.moe_experts = {experts}: every EP rank must hold the same "
                          f"number of experts (ep <= moe_experts and moe_experts divisible by ep)")
    if cfg.parallel.replace_experts_every < 0:
        raise ConfigError(f"parallel.replace_experts_every = {cfg.parallel.replace_experts_every}: must be >= 0")
    if cfg.parallel.replace_experts_every and (ep < 2 or cfg.parallel.pp > 1 or cfg.parallel.gp > 1):
        raise ConfigError(f"parallel.replace_experts_every = {cfg.parallel.replace_experts_every}: needs parallel.ep > 1 "
                          f"(now {ep}), and pp = gp = 1 (not yet with pipeline stages or graph parallelism)")
    spare = cfg.parallel.expert_replicas
    if spare < 0:
        raise ConfigError(f"parallel.expert_replicas = {spare}: must be >= 0")
    if spare and not (cfg.parallel.replace_experts_every and 0 < spare <= experts // ep):
        raise ConfigError(f"parallel.expert_replicas = {spare}: needs parallel.replace_experts_every > 0 (replicas are "
                          f"placed from measured load) and at most model.moe_experts / parallel.ep = "
                          f"{experts // max(ep, 1)} spare slots per rank")
    resident = cfg.parallel.resident_experts
    if resident < 0 or (resident and not experts):
        raise ConfigError(f"parallel.resident_experts = {resident}: must be >= 0, and > 0 only for an MoE model "
                          f"(model.moe_experts > 0)")
    if resident and (cfg.parallel.pp > 1 or cfg.parallel.gp > 1):
        raise ConfigError(f"parallel.resident_experts = {resident}: not yet with pipeline stages or graph "
                          f"parallelism (pp = {cfg.parallel.pp}, gp = {cfg.parallel.gp})")
    pp, chunks = cfg.parallel.pp, cfg.parallel.pp_chunks
    if pp < 1 or pp > cfg.model.blocks:
        raise ConfigError(f"parallel.pp = {pp}: need 1 <= pp <= model.blocks ({cfg.model.blocks}): every stage "
                          "runs at least one interaction block")
    if chunks < 1 or (chunks > 1 and pp == 1) or pp * chunks > cfg.model.blocks:
        raise ConfigError(f"parallel.pp_chunks = {chunks}: need >= 1, > 1 only with parallel.pp > 1, and pp · "
                          f"pp_chunks = {pp * chunks} stages <= model.blocks ({cfg.model.blocks})")
    if chunks > 1 and cfg.parallel.pp_schedule != "folded":
        raise ConfigError(f"parallel.pp_chunks = {chunks} with pp_schedule = {cfg.parallel.pp_schedule!r}: "
                          "interleaved stages run the 'folded' schedule (gpipe is the contiguous baseline)")
    split = cfg.parallel.pp_split
    if split and pp == 1:
        raise ConfigError(f"parallel.pp_split = {list(split)}: applies only with parallel.pp > 1")
    if split and (len(split) != pp * chunks or min(split) < 1 or sum(split) != cfg.model.blocks):
        raise ConfigError(f"parallel.pp_split = {list(split)}: need {pp * chunks} block counts (pp · pp_chunks) "
                          f">= 1 summing to model.blocks = {cfg.model.blocks}")
    if cfg.parallel.pp_schedule not in PP_SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule = {cfg.parallel.pp_schedule!r}: must be one of {', '.join(PP_SCHEDULES)}")
    if cfg.parallel.pp_alive < 0:
        raise ConfigError(f"parallel.pp_alive = {cfg.parallel.pp_alive}: must be >= 0 (0: chosen by simulation)")
    if cfg.parallel.pp_alive and cfg.parallel.pp_schedule != "folded":
        raise ConfigError(f"parallel.pp_alive = {cfg.parallel.pp_alive}: applies to pp_schedule = 'folded' only "
                          f"(gpipe keeps every micro-batch alive)")
    if pp > 1 and cfg.run.freeze == "backbone":  # a stage of frozen blocks has no parameter backward to run
        raise ConfigError(f'run.freeze = "backbone" with parallel.pp = {pp}: not supported (a pipeline stage whose '
                          f"blocks are all frozen has no trainable parameter); fine-tune with parallel.pp = 1")
    gp = cfg.parallel.gp
    if gp < 1:
        raise ConfigError(f"parallel.gp = {gp}: must be >= 1")
    if gp > 1 and pp > 1:
        raise ConfigError(f"parallel.gp = {gp} with parallel.pp = {pp}: graph and pipeline parallelism do not "
                          "compose yet; use one of them")
    if cfg.parallel.gp_halo not in GP_HALOS:
        raise ConfigError(f"parallel.gp_halo = {cfg.parallel.gp_halo!r}: must be one of {', '.join(GP_HALOS)}")
    if gp > 1 and cfg.parallel.gp_halo == "exchange" and cfg.model.block != "light":
        raise ConfigError(f'parallel.gp_halo = "exchange" with model.block = {cfg.model.block!r}: the per-block '
                          'halo exchange needs the light block; use parallel.gp_halo = "ghost"')
    if cfg.parallel.gp_min_atoms < 0:
        raise ConfigError(f"parallel.gp_min_atoms = {cfg.parallel.gp_min_atoms}: must be >= 0")
    if cfg.comm.backend not in BACKENDS:
        raise ConfigError(f"comm.backend = {cfg.comm.backend!r}: must be 'mpi', 'horovod' or 'torch'")
    _positive(cfg.comm.bucket_mb, "comm.bucket_mb", "MiB")
    _positive(cfg.data.micro_batches, "data.micro_batches")
    return cfg


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks a TOML value against a field's type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: must be a list")
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key} = {value!r}: must be of type {hint.__name__}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table")
        return _build(hint, value, key)
    raise ConfigError(f"{key}: unsupported type {hint}")  # a programming error in this module


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in table.items()}
    return cls(**kwargs)


def from_dict(table: dict[str, Any]) -> Config:
    table = dict(table)
    model = table.get("model", {})
    if isinstance(model, dict) and "preset" in model:  # not a table: _build says so
        model = dict(model)
        if not isinstance(model["preset"], str):
            raise ConfigError(f"model.preset = {model['preset']!r}: must be a string")
        base = dataclasses.asdict(model_preset(model.pop("preset")))
        model = {**{k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}, **model}
        table["model"] = model
    return validate(_build(Config, table, ""))


# Model-config fields whose default changed after files were written without them: the value such a
# file's model was built with (a field added with a default that keeps the old model needs no entry).
WRITTEN_BEFORE = {"line_width": 0, "density_sum": False}


def saved_model_table(table: dict[str, Any]) -> dict[str, Any]:
    """A model config as saved with a checkpoint or model file, its missing fields as written then."""
    return {**{k: v for k, v in WRITTEN_BEFORE.items() if k not in table}, **table}


def model_from_dict(table: dict[str, Any]) -> ModelConfig:
    """A ModelConfig saved with a checkpoint (tuples may come back as lists or stay tuples)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in saved_model_table(table).items()}
    return _build(ModelConfig, plain, "model")


def apply_overrides(table: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """A copy of a TOML table with `section.key=value` assignments applied (value in TOML syntax;
    a bare word is a string): how job templates and campaigns vary one config per point."""
    table = copy.deepcopy(table)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {assignment!r}: expected SECTION.KEY=VALUE, e.g. data.global_batch_size=64")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = table
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {assignment!r}: {part!r} is not a table")
        node[parts[-1]] = value
    return table


def resolve_resume(resume: str, base: Path) -> str:
    """run.resume as given ("" or "latest"), or its checkpoint path made absolute against `base`."""
    return resume if resume in ("", "latest") or Path(resume).is_absolute() else str((base / resume).resolve())


def read_table(path: Path) -> dict[str, Any]:
    """A TOML file's tables, unvalidated; a missing or malformed file is a ConfigError that names it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Reads and validates a TOML config, with `section.key=value` overrides applied; relative
    dataset paths resolve against the config's folder."""
    path = Path(path)
    table = apply_overrides(read_table(path), overrides)
    try:
        cfg = from_dict(table)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent

    def resolve(p: str) -> str:
        return p if Path(p).is_absolute() else str((base / p).resolve())

    train = tuple(resolve(p) for p in cfg.data.train)
    datasets = tuple(dataclasses.replace(d, path=resolve(d.path)) for d in cfg.data.datasets)
    out_dir = cfg.run.out_dir if Path(cfg.run.out_dir).is_absolute() else str(base / cfg.run.out_dir)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=train, datasets=datasets),
                               run=dataclasses.replace(cfg.run, out_dir=out_dir,
                                                       init_from=cfg.run.init_from and resolve(cfg.run.init_from),
                                                       resume=resolve_resume(cfg.run.resume, base)))
