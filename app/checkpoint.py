"""Checkpoints: one folder per step, written in parallel by the ranks that own a part and published
atomically; enough to continue a run exactly (the same losses and parameters as without the stop).

    RUN/checkpoints/step-00000010/
        dense.pt            world rank 0: dense parameters and buffers, their optimizer state, and the
                            trainer's `meta` (config, step = sampler position = LR-schedule step, ...)
        experts-ep0.pt …    the rank at dp coordinate 0 of each EP index: its experts (keyed by global
                            expert index) and their optimizer state
        rng-rank00000.pt …  every rank: its torch, numpy and python RNG states
        COMPLETE            rank 0, last: {"step", "world_size", "dp", "ep", "pp", "files": {name: bytes}}
    RUN/checkpoints/step-00000100.pt   after the last step only: the whole model in one file, for
                                       inference and fine-tuning (no optimizer state); `exaforce model
                                       export` writes the same as .pt or .safetensors

With pipeline stages (parallel.pp > 1) each stage writes its own part, from its first replica (dp
and EP coordinate 0): dense-pp0.pt, dense-pp1.pt … (that stage's dense parameters, the buffers every
stage holds, their optimizer state, and `meta`, whose progress carries that stage's FLOP
coefficients) and experts-pp0-ep0.pt … (that stage's experts of each EP index). Parameters keep their
global names (blocks.3.… stays blocks.3.…), so the parts together are the whole model's state.

Publishing: the parts go into a hidden `.step-00000010.partial/` (each file: temporary name, fsync,
rename), the ranks meet, rank 0 writes COMPLETE, renames the folder to `step-00000010` and fsyncs
the parent. A crash at any moment leaves the earlier checkpoints untouched and at worst a
`.partial` folder, which is never read and is deleted by the next save; a `step-*` folder without a
valid COMPLETE (say, a copy cut short) is ignored and deleted too. The newest `keep` are kept.

Optimizer state is stored by parameter name, never by position, so a checkpoint restores onto any
dp × ep × pp layout: every rank takes the dense entries its stage holds from whichever dense parts
hold them, and its experts from whichever expert files hold them (re-sharding when ep changed,
merging or splitting stages when pp changed).

Every file holds tensors and plain values only (dicts, lists, tuples, str, numbers, None; the RNG
states too), and every file is read with `torch.load(weights_only=True)`: model files travel
between groups, and unpickling an arbitrary object can run any code. A file holding anything else
is refused, never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from exaforce.config import ConfigError, ModelConfig, saved_model_table
from exaforce.io.atomic import remove, replace_path, write_file_atomically

FORMAT = 1
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step-(\d{8})")
EXPERTS = re.compile(r"experts-(pp\d+-)?ep\d+\.pt")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names the path and what to do."""


# ---------------------------------------------------------------- files
def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """`state` with every tensor on the host (a checkpoint loads on any device) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda f: torch.save(_on_host(state), f))
    return path


def _on_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()  # the tensor itself when it is already there
    if isinstance(value, dict):
        out = type(value)((k, _on_host(v)) for k, v in value.items())  # an OrderedDict stays one …
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # … with the state_dict's version metadata
        return out
    if type(value) in (list, tuple):
        return type(value)(_on_host(v) for v in value)
    return value


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def complete(folder: Path) -> dict[str, Any] | None:
    """The COMPLETE marker of a checkpoint folder whose every listed file has its listed size, else None."""
    marker, _ = _marker(folder)
    return marker


def _marker(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(the COMPLETE marker, "") of a complete checkpoint folder, else (None, why it is not)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        for name, size in marker["files"].items():
            actual = (Path(folder) / name).stat().st_size
            if actual != size:
                return None, f"{name} has {actual} bytes, {MARKER} lists {size} (cut short?)"
        pp = _saved_pp(marker)
        unlisted = [name for name in (dense_part(pp, s) for s in range(pp)) if pp > 1 and name not in marker["files"]]
        if unlisted:
            return None, f"stage part {unlisted[0]} is missing ({MARKER} records pp = {pp} but does not list it)"
        return marker, ""
    except FileNotFoundError as err:
        return None, f"{Path(err.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"unreadable {MARKER} marker ({type(err).__name__})"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted((p for p in found if complete(p) is not None), key=lambda p: p.name)


def latest(run_dir: Path, model_files: bool = False) -> Path | None:
    """The newest complete checkpoint folder of a run, or None: what `--resume` continues from.
    With `model_files`, single-file model exports count too, and one wins over its step's folder
    (one read instead of one per part): what inference and fine-tuning read (exaforce.model_io)."""
    found = checkpoints(run_dir)
    if model_files:
        found += [p for p in (Path(run_dir) / "checkpoints").glob("step-*.pt") if STEP_DIR.fullmatch(p.stem)
                  and p.is_file()]
    return max(found, key=lambda p: (p.stem, p.is_file()), default=None)  # stem: step-NNNNNNNN either way


# ---------------------------------------------------------------- save (collective)
def _expert_indices(expert_keys: set[str]) -> set[int]:
    """The experts (global indices, any layer) that state_dict keys `….experts.E.…` belong to."""
    return {int(k.split(".experts.")[1].split(".")[0]) for k in expert_keys}


def _expert_keys(model: torch.nn.Module, owned: bool = False) -> set[str]:
    """state_dict keys of the experts this rank holds (MoE layers' `experts` ModuleDicts); `owned`:
    without the replicas it holds of other ranks' experts (one copy of each expert is written)."""
    layers = {id(m): m for m in getattr(model, "moe_layers", [])}
    prefixes = tuple(f"{name}.experts.{e}." for name, m in model.named_modules() if id(m) in layers
                     for e in (m.owned_experts() if owned else m.local_experts()))
    return {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, keys: set[str]) -> dict[str, dict]:
    """Per-parameter optimizer state (AdamW: step, exp_avg, exp_avg_sq) by parameter name."""
    return {name: dict(optimizer.state[p]) for name, p in model.named_parameters()
            if name in keys and p in optimizer.state}


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (numpy's key array as a tensor)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dense_part(pp: int, stage: int) -> str:
    """The file of stage `stage`'s dense parameters in a checkpoint written with `pp` stages."""
    return "dense.pt" if pp == 1 else f"dense-pp{stage}.pt"


def expert_part(pp: int, stage: int, ep_index: int) -> str:
    """The file of the experts of stage `stage` held by EP index `ep_index`."""
    return f"experts-ep{ep_index}.pt" if pp == 1 else f"experts-pp{stage}-ep{ep_index}.pt"


def _saved_pp(marker: dict[str, Any]) -> int:
    return int(marker.get("pp", 1))  # checkpoints from before pipeline stages: one


def _write_part(folder: Path, name: str, state: dict[str, Any]) -> tuple[str, int]:
    write_file_atomically(folder / name, lambda f: torch.save(_on_host(state), f))
    return name, (folder / name).stat().st_size


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, topo: Any,
         meta: dict[str, Any], keep: int = 0) -> Path:
    """Collective over the world: writes checkpoint `step` (see the module docstring), keeps the
    newest `keep` (0: all); returns its folder. `meta` goes into dense.pt as it is."""
    root = Path(run_dir) / "checkpoints"
    final, partial = step_folder(run_dir, step), root / f".step-{step:08d}.partial"
    if topo.is_root:
        root.mkdir(parents=True, exist_ok=True)
        remove(partial)  # debris of an earlier attempt at this step
        partial.mkdir()
    topo.barrier()  # collective: the folder exists before anybody writes into it

    layout = topo.layout
    ep_index, stage = layout.ep_index(topo.rank), layout.pp_index(topo.rank)
    first = layout.dp_index(topo.rank) == 0 and layout.gp_index(topo.rank) == 0  # of the replicas (GP peers alike)
    state = model.state_dict()  # pipeline: this rank's stage only
    expert_keys = _expert_keys(model)
    written = [_write_part(partial, f"rng-rank{topo.rank:05d}.pt", rng_state())]
    if first and ep_index == 0:  # the stage's first replica (world rank 0 without stages)
        dense = {k: v for k, v in state.items() if k not in expert_keys}
        written.append(_write_part(partial, dense_part(layout.pp, stage), {
            "format": FORMAT, "model": dense, "optimizer": _optimizer_state(model, optimizer, set(dense)),
            "meta": meta}))
    held: dict[str, list[int]] = {}  # expert file → the experts it holds (any layer): placement-independent
    owned_keys = _expert_keys(model, owned=True)
    if first and owned_keys:  # one copy of each expert shard: the first of its EDP group, the owner of a replicated one
        experts = {k: v for k, v in state.items() if k in owned_keys}
        name = expert_part(layout.pp, stage, ep_index)
        written.append(_write_part(partial, name, {
            "format": FORMAT, "model": experts, "optimizer": _optimizer_state(model, optimizer, owned_keys)}))
        held[name] = sorted(_expert_indices(owned_keys))
    parts = topo.gather_to_root((written, held))  # collective: every part is on disk (fsynced) from here

    if topo.is_root:
        marker = {"format": FORMAT, "step": step, "world_size": topo.world_size, "dp": layout.dp,
                  "ep": layout.ep, "pp": layout.pp, "gp": layout.gp,
                  "files": dict(sorted(item for files, _ in parts for item in files)),
                  "expert_files": dict(sorted(item for _, held in parts for item in held.items()))}
        write_file_atomically(partial / MARKER, lambda f: f.write(json.dumps(marker, indent=1).encode()))
        replace_path(partial, final)  # the atomic publication (and an fsync of the parent)
        _prune(root, keep)
    topo.barrier()  # collective: nobody goes on, or exits, before the checkpoint is published
    return final


def _prune(root: Path, keep: int) -> None:
    """Deletes unpublished debris, step folders without a valid COMPLETE, and all but the newest `keep`."""
    for entry in root.iterdir():
        if entry.name.startswith(".step-") or (STEP_DIR.fullmatch(entry.name) and entry.is_dir()
                                               and complete(entry) is None):
            remove(entry)
    done = checkpoints(root.parent)
    for old in done[:-keep] if keep else []:
        remove(old)


# ---------------------------------------------------------------- resume (collective)
def resume_point(run_dir: Path, spec: str, topo: Any, log: Callable[[str], None]) -> Path | None:
    """Collective: the checkpoint folder a run continues from (rank 0 looks, everybody gets the answer).

    spec "": a new run, refused if the run folder already holds checkpoints (two trajectories would
    mix); "latest": the newest complete checkpoint, None when there is none (the first submission
    of a job that is resubmitted with the same command); otherwise a checkpoint folder, or a run
    folder meaning its newest."""
    answer: tuple[str, str | None] = ("ok", None)
    if topo.is_root:
        try:
            found = _resume_point(Path(run_dir), spec)
            answer = ("ok", str(found) if found else None)
            for skipped, why in _skipped(Path(run_dir), found) if spec else ():
                log(f"resume: skipped {skipped}, newer but not a complete checkpoint: {why}")
        except CheckpointError as err:
            answer = ("error", str(err))
    status, value = topo.from_root(answer)  # collective
    if status == "error":
        raise CheckpointError(value)
    return Path(value) if value else None


def _skipped(run_dir: Path, chosen: Path | None) -> list[tuple[str, str]]:
    """Step folders newer than `chosen` that are not complete checkpoints, with the reason."""
    root = Path(run_dir) / "checkpoints"
    newer = sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()
                   and (chosen is None or p.name > chosen.name)) if root.is_dir() else []
    return [(p.name, why) for p in newer for marker, why in [_marker(p)] if marker is None]


def _resume_point(run_dir: Path, spec: str) -> Path | None:
    newest = latest(run_dir)
    if spec == "":
        if newest is not None:
            raise CheckpointError(f"run.out_dir = {run_dir} already holds checkpoints (newest: {newest.name}): "
                                  f"continue that run with --resume, or train into an empty run.out_dir")
        return None
    if spec == "latest":
        return newest
    path = Path(spec)
    if (path / "checkpoints").is_dir():
        path = latest(path)
        if path is None:
            raise CheckpointError(f"--resume {spec}: no complete checkpoint in {Path(spec) / 'checkpoints'}")
    if path.is_file():
        raise CheckpointError(f"--resume {spec}: a single-file model export holds no optimizer or sampler state; "
                              f"resume from a checkpoint folder (…/checkpoints/step-NNNNNNNN)")
    marker, why = _marker(path)
    if marker is None:
        raise CheckpointError(f"--resume {spec}: not a complete checkpoint ({why}; a save that was cut short, "
                              f"or a part removed since)")
    newer = [p.name for p in checkpoints(run_dir) if int(STEP_DIR.fullmatch(p.name).group(1)) > marker["step"]]
    if newer:
        raise CheckpointError(f"--resume {spec}: {run_dir / 'checkpoints'} holds newer checkpoints "
                              f"({', '.join(newer)}); continuing from step {marker['step']} would mix two "
                              f"trajectories: delete them, or resume from latest")
    return path


def read(path: Path) -> dict[str, Any]:
    """A checkpoint file's tensors and plain values; anything else is refused, never unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = str(err).split("Unsupported global: ")[-1].split(" was not an allowed global")[0].strip()
        raise CheckpointError(f"{path}: refused: it holds Python objects beyond tensors and plain values "
                              f"({what[:120]}); loading them could run code, so exaforce never does") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an exaforce checkpoint file (holds a {type(state).__name__}, not a dict)")
    return state


def restore(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, topo: Any,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Collective over the world: loads checkpoint `folder` into `model` and `optimizer` on this
    topology (re-sharding the experts if ep changed, merging or splitting stage parts if pp changed)
    and this rank's RNG states (when the world size is the one that saved them); returns the `meta`
    given to `save` (with pipeline stages: that of this stage's part, when pp is unchanged). Each
    stage's first replica (world rank 0 without stages) reads the marker and the dense entries its
    stage holds and broadcasts them over the stage; the first rank of each EDP group reads the
    expert files holding its experts and broadcasts them over the group; every rank reads only its
    own RNG file."""
    folder = Path(folder)
    layout = topo.layout
    stage = layout.pp_index(topo.rank)
    expert_keys = _expert_keys(model)
    marker, dense, why = None, None, ""
    first = layout.dp_index(topo.rank) == 0 and layout.gp_index(topo.rank) == 0
    if first and layout.ep_index(topo.rank) == 0:
        # one reader per stage: a job of thousands of ranks must not stat and read every file thousands of times
        marker, why = _marker(folder)
        if marker is not None:
            saved_pp = _saved_pp(marker)
            names = [dense_part(saved_pp, s) for s in range(saved_pp)]
            own = names[stage] if saved_pp == layout.pp else names[0]  # whose meta (FLOP coefficients) we take
            dense = _entries(folder, [own, *(n for n in names if n != own)],
                             set(model.state_dict()) - expert_keys)
    marker, dense, why = broadcast_state((marker, dense, why), topo.stage_comm)  # collective over the stage
    if marker is None:
        raise CheckpointError(f"{folder}: not a complete checkpoint ({why})")
    _check_model_config(folder, dense["meta"]["config"]["model"], model)

    saved_pp = _saved_pp(marker)
    experts: dict[str, Any] = {"model": {}, "optimizer": {}}
    if first and expert_keys:
        mine = _expert_indices(expert_keys)
        stages = [stage, *(s for s in range(saved_pp) if s != stage)] if saved_pp == layout.pp else range(saved_pp)
        held = marker.get("expert_files")  # absent before placements existed: X/ep consecutive experts per file
        shards = range(marker["ep"]) if held is not None else sorted({e // (model.cfg.moe_experts // marker["ep"])
                                                                      for e in mine})
        names = [expert_part(saved_pp, s, shard) for s in stages for shard in shards]  # this stage's files first
        if held is not None:  # the files holding any of my experts, whatever placement saved them
            names = [n for n in names if mine & set(held.get(n, ()))]
        experts = _entries(folder, [n for n in names if n in marker["files"]], expert_keys)
    experts = broadcast_state(experts, topo.edp_comm)  # collective over the EDP group

    try:
        model.load_state_dict({**dense["model"], **experts["model"]}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder}: the weights do not fit this model: {str(err).splitlines()[0]}") from None
    _load_optimizer_state(folder, model, optimizer, {**dense["optimizer"], **experts["optimizer"]})
    if marker["world_size"] == topo.world_size:
        set_rng_state(read(folder / f"rng-rank{topo.rank:05d}.pt"))
    else:
        log(f"resume: saved on {marker['world_size']} rank(s), now {topo.world_size}: RNG states start from the seed "
            f"(the training step draws no random numbers, so the trajectory is unaffected)")
    if (marker["dp"], marker["ep"], saved_pp) != (layout.dp, layout.ep, layout.pp):
        log(f"resume: dp × ep = {marker['dp']} × {marker['ep']} → {layout.dp} × {layout.ep}"
            + (" (experts re-sharded)" if marker["ep"] != layout.ep and expert_keys else "")
            + (f"; pipeline stages {saved_pp} → {layout.pp} (stage parts "
               f"{'merged' if saved_pp > layout.pp else 'split'})" if saved_pp != layout.pp else ""))
    return dense["meta"]


def _entries(folder: Path, names: list[str], keys: set[str]) -> dict[str, Any]:
    """{"model", "optimizer"} entries named in `keys` from the checkpoint parts `names`, read in that
    order until every key is found, and the first part's "meta" (when it has one)."""
    out: dict[str, Any] = {"model": {}, "optimizer": {}}
    for i, name in enumerate(names):
        if i and keys <= out["model"].keys():
            break  # the rest hold none of ours
        part = read(folder / name)
        if i == 0 and "meta" in part:
            out["meta"] = part["meta"]
        out["model"].update({k: v for k, v in part["model"].items() if k in keys})
        out["optimizer"].update({k: v for k, v in part["optimizer"].items() if k in keys})
    return out


class _Slot:
    """Where a tensor sits in a broadcast state: its index, dtype and shape."""

    def __init__(self, index: int, tensor: torch.Tensor):
        self.index, self.dtype, self.shape = index, tensor.dtype, tuple(tensor.shape)


def broadcast_state(state: Any, comm: Any, chunk_bytes: int = 2**30) -> Any:
    """Collective: `state` (nested dicts, lists, tuples with tensors inside) from comm rank 0 to every
    rank. The structure travels pickled; tensor bytes travel as raw buffers (MPI Bcast, in chunks of
    at most 1 GiB), so a multi-GB state is neither pickled nor copied more than once."""
    if comm.Get_size() == 1:
        return state
    tensors: list[torch.Tensor] = []

    def strip(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj.detach().contiguous())
            return _Slot(len(tensors) - 1, obj)
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(strip(v) for v in obj)
        return obj

    root = comm.Get_rank() == 0
    skeleton = comm.bcast(strip(state) if root else None, root=0)  # collective: structure and slots

    def fill(obj: Any) -> Any:
        if isinstance(obj, _Slot):
            tensor = tensors[obj.index] if root else torch.empty(obj.shape, dtype=obj.dtype)
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            for start in range(0, raw.size, chunk_bytes):
                comm.Bcast(raw[start:start + chunk_bytes], root=0)  # collective: raw bytes
            return tensor
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(fill(v) for v in obj)
        return obj

    return fill(skeleton)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, current value)} of every model-config field that differs, in `current`'s
    order, then fields only `saved` has. A tuple equals the list it becomes when a config is saved.
    Restore needs equality; fine-tuning (exaforce.finetune) lets the heads differ. A field the saved
    config lacks (added to ModelConfig after the checkpoint was written) counts as its default, or as
    its value then where the default has changed since (config.WRITTEN_BEFORE)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    saved = saved_model_table(saved)
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    keys = [*current, *(k for k in saved if k not in current)]
    return {k: (saved.get(k), current.get(k)) for k in keys if _plain(saved.get(k)) != _plain(current.get(k))}


def _check_model_config(folder: Path, saved: dict[str, Any], model: torch.nn.Module) -> None:
    differ = [f"model.{k} = {_plain(then)!r} in the checkpoint, {_plain(now)!r} now"
              for k, (then, now) in sorted(model_config_differences(saved, dataclasses.asdict(model.cfg)).items())]
    if differ:
        raise CheckpointError(f"{folder}: the checkpoint's model differs from this config's: {'; '.join(differ)}")


def _load_optimizer_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          saved: dict[str, dict]) -> None:
    """Per-name state onto this optimizer's parameters (through load_state_dict: dtype and device
    follow the parameters)."""
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - saved.keys())
    if saved and missing:
        raise CheckpointError(f"{folder}: no optimizer state for {len(missing)} parameter(s), e.g. {missing[0]}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: saved[names[id(p)]] for i, p in enumerate(params) if names.get(id(p)) in saved}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ---------------------------------------------------------------- the whole model (inference)
def load(path: Path) -> dict[str, Any]:
    """{"step", "config", "model"} with the whole model (every expert) from a checkpoint folder, or
    a single-file checkpoint as saved (the final-step export, a safetensors export, or an older
    exaforce's checkpoint)."""
    path = Path(path)
    if path.is_dir():
        marker, why = _marker(path)
        if marker is None:
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no valid {MARKER} marker: {why})")
        pp = _saved_pp(marker)
        dense = read(path / dense_part(pp, 0))
        model = dict(dense["model"])
        experts = sorted(name for name in marker["files"] if EXPERTS.fullmatch(name))
        for name in [dense_part(pp, s) for s in range(1, pp)] + experts:
            model.update(read(path / name)["model"])  # stage parts: the buffers every stage holds are equal
        return {"step": dense["meta"]["step"], "config": dense["meta"]["config"], "model": model,
                "written_by": dense["meta"].get("written_by", {})}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return _load_safetensors(path) if path.suffix == SAFETENSORS else read(path)


def export_model(folder: Path, path: Path) -> Path:
    """The whole model of checkpoint `folder` as one file (read back from disk: it also proves the
    folder loads)."""
    return write_model_file(load(folder), path)


def write_model_file(state: dict[str, Any], path: Path) -> Path:
    """`load`'s state of a whole model as one file: a torch file, or a safetensors file when `path`
    ends in .safetensors."""
    if Path(path).suffix == SAFETENSORS:
        return _save_safetensors(state, Path(path))
    return save_atomic(state, path)


# ---------------------------------------------------------------- safetensors model files
SAFETENSORS = ".safetensors"
SAFETENSORS_FORMAT = "exaforce-model-1"


def _save_safetensors(state: dict[str, Any], path: Path) -> Path:
    """The weights as safetensors tensors and the rest (step, config, versions) as JSON strings in its
    header metadata: a file any safetensors reader opens, in any language, with nothing to unpickle."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state["model"].items()}
    metadata = {"format": SAFETENSORS_FORMAT, "step": str(int(state["step"])),
                "config": json.dumps(state["config"]), "written_by": json.dumps(state.get("written_by", {}))}
    payload = save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda f: f.write(payload))
    return path


def _load_safetensors(path: Path) -> dict[str, Any]:
    """{"step", "config", "model", "written_by"} of a safetensors model file written by exaforce."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SAFETENSORS_FORMAT:
                raise CheckpointError(f"{path}: not an exaforce model file (its safetensors metadata has format "
                                      f"{metadata.get('format')!r}, expected {SAFETENSORS_FORMAT!r})")
            model = {name: f.get_tensor(name) for name in f.keys()}
        return {"step": int(metadata["step"]), "config": json.loads(metadata["config"]), "model": model,
                "written_by": json.loads(metadata.get("written_by", "{}"))}
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors model file ({type(err).__name__}: {err})") from None
