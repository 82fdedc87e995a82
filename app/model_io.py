"""A whole model for use: read back from a checkpoint for inference and fine-tuning (the ASE
calculator, `exaforce predict`, `run.init_from`), or a preset with seeded random weights (tests,
benchmarks).

Why one module: a caller names a checkpoint folder, a single-file model export, or a run folder
(its newest checkpoint, found by `checkpoint.latest`, the same function `--resume` uses) and gets
the same TrainedModel; what lies on disk, and which checkpoint is newest, stay the business of
`exaforce.checkpoint`, so a change of layout touches that module alone. Restoring a run onto its
dp × ep layout with optimizer state is `checkpoint.restore`, not this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exaforce import checkpoint
from exaforce.config import ConfigError, ModelConfig, model_from_dict, model_preset
from exaforce.model.potential import Potential


@dataclass(frozen=True)
class TrainedModel:
    """The whole model of one checkpoint (every expert), on the CPU, not yet built."""

    path: Path                          # the checkpoint that was read
    step: int                           # optimizer steps it was trained for
    config: ModelConfig
    state: dict[str, torch.Tensor]      # Potential.state_dict() of the full model
    written_by: dict = field(default_factory=dict)  # {"exaforce", "torch"} versions (empty: older files)

    def build(self, dtype: torch.dtype = torch.float64) -> Potential:
        """A Potential holding these weights. Built on the meta device and then given the checkpoint's
        tensors, so no random initialisation runs and the global RNG is left as it was."""
        with torch.device("meta"):
            model = Potential(self.config)
        try:
            model.load_state_dict(self.state, strict=True, assign=True)
        except RuntimeError as err:
            raise ConfigError(f"{self.path}: the weights do not fit the checkpoint's own model config: "
                              f"{str(err).splitlines()[0]}") from None
        return model.to(dtype)

    def describe(self) -> dict:
        """What a user or a tool needs to know to run this model, read from the file alone (no model
        is built): elements, cutoffs, the receptive field (the ghost-atom range a domain-decomposed
        MD code must provide), heads with their reference energies, units, sizes and the versions
        that wrote it."""
        cfg = self.config
        reference_HX = self.state["reference_energy_HX"].double()
        scale_H = self.state["energy_scale_H"].double()
        parameters = sum(t.numel() for k, t in self.state.items() if k.rsplit(".", 1)[-1] not in BUFFERS)
        return {
            "file": str(self.path), "step": self.step, "written_by": self.written_by,
            "elements": list(cfg.elements),
            "heads": {head: {"reference_energy_ev": {el: float(reference_HX[h, x]) for x, el in enumerate(cfg.elements)},
                             "energy_scale_ev": float(scale_H[h])} for h, head in enumerate(cfg.heads)},
            "cutoff_a": cfg.cutoff, "three_body_cutoff_a": cfg.three_body_cutoff, "blocks": cfg.blocks,
            "receptive_field_a": receptive_field(cfg),
            "width": cfg.width, "line_width": cfg.line_channels, "moe_experts": cfg.moe_experts, "moe_top_k": cfg.moe_top_k, "parameters": parameters,
            "units": UNITS, "model_config": dataclasses.asdict(cfg),
        }


def receptive_field(cfg: ModelConfig) -> float:
    """How far (Å) an atom's energy reaches. Light block: bond features see only bonds of their own
    source atom within the three-body cutoff, so one block reaches max(cutoff, 2·three-body cutoff)
    (a short bond's far end) and every further block one more cutoff through the atoms' features.
    MatRIS block: bonds also carry atom features into the line graph, so each block may reach
    cutoff + 2·three-body cutoff (an upper bound)."""
    reach = max(cfg.cutoff, 2 * cfg.three_body_cutoff)
    if cfg.block == "matris":
        return cfg.blocks * (cfg.cutoff + 2 * cfg.three_body_cutoff)
    return (cfg.blocks - 1) * cfg.cutoff + reach


BUFFERS = ("reference_energy_HX", "energy_scale_H", "freq_R")  # state entries that are not trained weights
UNITS = {"positions": "Å", "energy": "eV", "forces": "eV/Å",
         "stress": "eV/Å³ (ASE's sign and Voigt order xx yy zz yz xz xy; the training loss reads GPa)"}


def load_trained(path: str | Path) -> TrainedModel:
    """Reads a checkpoint as `checkpoint.load` understands it (a checkpoint folder
    `RUN/checkpoints/step-NNNNNNNN/`, or a single-file model `step-NNNNNNNN.pt`), or a run folder,
    meaning its newest complete checkpoint (a single-file model where its step has one)."""
    path, state = read_model_state(path)
    return TrainedModel(path=path, step=int(state.get("step", 0)), config=model_from_dict(state["config"]["model"]),
                        state=state["model"], written_by=dict(state.get("written_by", {})))


def read_model_state(path: str | Path) -> tuple[Path, dict]:
    """The checkpoint that `path` names (a run folder: its newest) and `checkpoint.load`'s state of it,
    checked to hold an exaforce model: what load_trained builds from, and what `model export` writes."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        newest = checkpoint.latest(path, model_files=True)
        if newest is None:
            raise ConfigError(f"{path}: run folder without a complete checkpoint in {path / 'checkpoints'}")
        path = newest
    if not path.exists():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        state = checkpoint.load(path)
    except (OSError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: unreadable checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("model") is None or "config" not in state:
        raise ConfigError(f"{path}: not an exaforce checkpoint (no model weights and config)")
    return path, state


def preset_model(name: str, seed: int = 0, **overrides) -> Potential:
    """Random weights, drawn from `seed`, at a named model size; keyword arguments override fields
    of the preset's ModelConfig (e.g. elements=("Cu", "Au")). The caller's RNG stream is left as it was."""
    cfg = dataclasses.replace(model_preset(name), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Potential(cfg)
