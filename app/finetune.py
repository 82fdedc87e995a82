"""Fine-tuning: a training run that starts from a trained checkpoint (`run.init_from`), with every
parameter trainable (`run.freeze = "none"`) or only the readout and the head embeddings
(`run.freeze = "backbone"`).

The model config must equal the checkpoint's in everything but `model.heads`, which must list the
checkpoint's heads (by name, any order) and may add new ones: a new dataset gets a new head.
Weights are copied by name; tensors with one row per head are copied row by row, matched by head
name. A new head starts as the mean of the checkpoint's heads (its readout row, its embedding on
the atom features and in every MoE router: zero when the checkpoint had one head and hence no
embedding), with reference energies and energy scale fitted on its own data by the trainer. The
checkpoint's heads keep the reference energies and scales they were trained with.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from exaforce.checkpoint import model_config_differences
from exaforce.config import Config, ConfigError, ModelConfig
from exaforce.model.potential import Potential
from exaforce.model_io import TrainedModel, load_trained

HEAD_ROWS = re.compile(r"(^|\.)head_embedding\.weight$|^readout\.down\.(weight|bias)$|^reference_energy_HX$|"
                       r"^energy_scale_H$")  # state entries whose rows are the energy heads
FITTED = ("reference_energy_HX", "energy_scale_H")  # per-head statistics: a new head keeps the trainer's fit
TRAINABLE_WITH_FROZEN_BACKBONE = re.compile(r"^readout(_norm)?\.|(^|\.)head_embedding\.weight$")


def initialise(model: Potential, cfg: Config, log: Callable[[str], None]) -> None:
    """Copies `run.init_from`'s weights into the freshly built `model` (after the trainer fitted the
    reference energies, before parameters are synchronised: every rank loads its own shard of the
    experts, rank 0 the dense part the others receive) and applies `run.freeze`; nothing without init_from."""
    if not cfg.run.init_from:
        return
    trained = load_trained(cfg.run.init_from)
    check_compatible(trained, cfg.model)
    copy_weights(model, trained)
    new = [h for h in cfg.model.heads if h not in trained.config.heads]
    message = (f"fine-tuning from {trained.path} (step {trained.step}): heads {list(trained.config.heads)} kept, "
               f"new {new or 'none'}")
    if cfg.run.freeze == "backbone":
        trainable = freeze_backbone(model)
        total = sum(p.numel() for p in model.parameters())
        message += f"; backbone frozen, {trainable:,} of {total:,} parameters on this rank trainable"
    log(message)


def check_compatible(trained: TrainedModel, model_cfg: ModelConfig) -> None:
    """The run's model must have the checkpoint's shape; heads may be added, none removed."""
    differences = model_config_differences(dataclasses.asdict(trained.config), dataclasses.asdict(model_cfg))
    differ = [f"model.{k} = {ours!r} (the checkpoint's: {theirs!r})" for k, (theirs, ours) in differences.items()
              if k != "heads"]
    if differ:
        raise ConfigError(f"run.init_from = {str(trained.path)!r}: the model differs from the checkpoint's: "
                          + "; ".join(differ))
    missing = [h for h in trained.config.heads if h not in model_cfg.heads]
    if missing:
        raise ConfigError(f"model.heads = {list(model_cfg.heads)}: must keep the checkpoint's heads "
                          f"{list(trained.config.heads)} (missing {missing}) and may add new ones")


@torch.no_grad()
def copy_weights(model: Potential, trained: TrainedModel) -> None:
    """Every tensor of `model` from the checkpoint; rows of per-head tensors matched by head name
    (new heads: the mean of the checkpoint's rows, or the trainer's fit for reference energies and
    scales). Tensors of experts this rank does not hold are skipped."""
    old_heads, new_heads = trained.config.heads, model.cfg.heads
    for key, target in model.state_dict().items():  # shares storage with the model's tensors
        source = trained.state.get(key)
        if not HEAD_ROWS.search(key):
            if source is None or source.shape != target.shape:
                raise ConfigError(f"{trained.path}: {key} is {None if source is None else tuple(source.shape)} in "
                                  f"the checkpoint, the model needs {tuple(target.shape)}")
            target.copy_(source)
            continue
        if source is None:  # a one-head checkpoint has no head embedding: its head's is zero
            source = torch.zeros((1, *target.shape[1:]), dtype=target.dtype)
        for row, head in enumerate(new_heads):
            if head in old_heads:
                target[row] = source[old_heads.index(head)]
            elif key not in FITTED:
                target[row] = source.mean(0)


def freeze_backbone(model: Potential) -> int:
    """Only the readout (norm, MLP) and the head embeddings (atom features, MoE routers) keep
    requires_grad; returns the number of trainable parameters. The gradient reducers skip frozen
    parameters, the optimizer never sees a gradient for them."""
    trainable = 0
    for name, parameter in model.named_parameters():
        keep = bool(TRAINABLE_WITH_FROZEN_BACKBONE.search(name))
        parameter.requires_grad_(keep)
        trainable += parameter.numel() if keep else 0
    return trainable
