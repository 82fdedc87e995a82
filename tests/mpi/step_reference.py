"""What the equivalence scripts under mpiexec share (imported from beside them): the default model's
light-block options to put on a small preset, the seeded float64 model every rank starts from, and the
single-process step on the whole global batch that a distributed step must equal (parameter
gradients, loss, gradient norm, MoE aux loss)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from exaforce.comm.groups import build_groups
from exaforce.config import Config, ParallelConfig
from exaforce.graph import GraphBatch
from exaforce.model.potential import Potential
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer
from exaforce.training.step import StepResult, train_step


# The default model's light-block shape at the small presets' width (16): a line graph narrower than
# the atoms and bonds, and the neighbour-density input (the presets themselves have neither).
DEFAULT_SHAPE = {"line_width": 8, "density_sum": True}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.nan_to_num(np.asarray(a)), np.nan_to_num(np.asarray(b))
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-300))


def seeded_model(cfg: Config, ep_rank: int = 0, ep_size: int = 1) -> Potential:
    """The same float64 model on every rank (its EP shard of the experts), with nonzero references."""
    torch.manual_seed(5)
    model = Potential(cfg.model, ep_rank, ep_size).double()
    with torch.no_grad():
        model.energy_scale_H.fill_(0.5)
        model.reference_energy_HX.normal_()
    return model


def compare_with_serial(cfg: Config, batch: GraphBatch, global_batch: int, step: StepResult,
                        rank_grads: list[dict[str, np.ndarray]]) -> tuple[Potential, dict, dict[str, float]]:
    """The serial step (plain autograd, one process, lr 0) on `batch`, the whole global batch; returns
    the serial model, the differences of loss, gradient norm and aux loss, and the worst relative
    difference of each parameter's gradient over every rank's copy."""
    serial_cfg = dataclasses.replace(cfg, parallel=ParallelConfig(), run=dataclasses.replace(cfg.run, recompute_lines=0))
    serial = seeded_model(serial_cfg)
    solo = Topology.single_process()
    serial_parallel = parallelize(serial, solo, build_groups("mpi", solo), serial_cfg)
    optimizer, _ = make_optimizer(serial, serial_cfg)
    reference = train_step(serial, [batch], optimizer, serial_parallel, serial_cfg, 1.0 / global_batch, lr=0.0)
    params = dict(serial.named_parameters())
    grad_diffs: dict[str, float] = {}
    for grads in rank_grads:  # every rank's copy of every parameter it holds
        for name, grad in grads.items():
            grad_diffs[name] = max(grad_diffs.get(name, 0.0), rel_diff(grad, params[name].grad.numpy()))
    diffs = {"loss": rel_diff(step.loss, reference.loss), "grad_norm": rel_diff(step.grad_norm, reference.grad_norm)}
    if "moe_aux" in reference.loss_sums:
        diffs["moe_aux"] = rel_diff(step.loss_sums["moe_aux"], reference.loss_sums["moe_aux"])
    diffs["loss_value"] = reference.loss
    return serial, diffs, grad_diffs
