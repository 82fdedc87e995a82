"""A trained model read back from a checkpoint: the one place that loads weights for inference and
fine-tuning (the ASE calculator, `exaforce predict`, `run.init_from`).

Why one function: the checkpoint layout belongs to the trainer and `exaforce.checkpoint` (sharded
folders, and a single-file model export); everything that reads a model back goes through
`load_trained`, so a change of layout touches only this function and `checkpoint.load`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from exaforce import checkpoint
from exaforce.config import ConfigError, ModelConfig, model_from_dict
from exaforce.model.potential import Potential


@dataclass(frozen=True)
class TrainedModel:
    """The whole model of one checkpoint (every expert), on the CPU, not yet built."""

    path: Path                          # the checkpoint that was read
    step: int                           # optimizer steps it was trained for
    config: ModelConfig
    state: dict[str, torch.Tensor]      # Potential.state_dict() of the full model

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


def load_trained(path: str | Path) -> TrainedModel:
    """Reads a checkpoint as `exaforce.checkpoint.load` understands it (a checkpoint folder
    `RUN/checkpoints/step-NNNNNNNN/`, or a single-file model `step-NNNNNNNN.pt`), or a run folder,
    meaning its newest complete checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = _newest(path / "checkpoints")
    if not path.exists():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        state = checkpoint.load(path)
    except (OSError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: unreadable checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("model") is None or "config" not in state:
        raise ConfigError(f"{path}: not an exaforce checkpoint (no model weights and config)")
    return TrainedModel(path=path, step=int(state.get("step", 0)), config=model_from_dict(state["config"]["model"]),
                        state=state["model"])


def _newest(folder: Path) -> Path:
    """The newest step's checkpoint in RUN/checkpoints: its single-file model if there is one (one read),
    else its folder if complete (a valid COMPLETE marker)."""
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"step-(\d{8})(\.pt)?", entry.name)
        if match and (entry.is_file() or checkpoint.complete(entry) is not None):
            found.append((int(match.group(1)), entry.is_file(), entry))
    if not found:
        raise ConfigError(f"{folder.parent}: run folder without a complete checkpoint in {folder}")
    return max(found)[2]
