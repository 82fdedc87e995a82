"""Run under `mpiexec -n 2 script OUT` (the run folder beside OUT): an ep = 2 MoE model whose experts sit in an uneven,
non-contiguous placement saves a checkpoint (weights and AdamW state marked per expert); a fresh
ep = 2 model in the default placement, and rank 0 alone with every expert, restore it. Rank 0 writes
whether every expert came back with its own weights and state, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from exaforce import checkpoint
from exaforce.config import from_dict
from exaforce.model.potential import Potential
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer

SCATTERED = np.array([1, 0, 0, 0, 1, 0, 0, 1])


def marked(model: Potential, optimizer: torch.optim.Optimizer) -> None:
    """Expert e's weights shifted by e/100 and its AdamW moments set to e + 1: each expert recognisable."""
    with torch.no_grad():
        for layer in model.moe_layers:
            for e, expert in layer.experts.items():
                for p in expert.parameters():
                    p.add_(int(e) / 100)
                    optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.full_like(p, int(e) + 1),
                                          "exp_avg_sq": torch.full_like(p, int(e) + 1)}
        for p in model.dense_parameters():
            optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def mismatches(model: Potential, optimizer: torch.optim.Optimizer, reference: Potential) -> list[str]:
    """Experts whose weights differ from the reference's or whose optimizer state is not their own."""
    wrong = []
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if ".experts." not in name:
            continue
        e = int(name.split(".experts.")[1].split(".")[0])
        if not torch.equal(p, ref[name]) or not torch.equal(optimizer.state[p]["exp_avg"], torch.full_like(p, e + 1)):
            wrong.append(name)
    return wrong


def main(out_path: str) -> None:
    run_dir = str(Path(out_path).parent / "run")
    topo = Topology.from_mpi(ep=2)
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": 2},
                     "model": {"preset": "small-moe", "moe_experts": 8, "moe_top_k": 2}, "parallel": {"ep": 2},
                     "run": {"dtype": "float64", "out_dir": run_dir}})

    def build(ep_rank: int, ep_size: int, placement: np.ndarray | None) -> tuple[Potential, torch.optim.Optimizer]:
        torch.manual_seed(5)
        model = Potential(cfg.model, ep_rank, ep_size).double()
        for layer in model.moe_layers if placement is not None else []:
            layer.place_initial(placement)
        return model, make_optimizer(model, cfg)[0]

    ep_rank = topo.layout.ep_index(topo.rank)
    saved, saved_optimizer = build(ep_rank, 2, SCATTERED)
    marked(saved, saved_optimizer)
    meta = {"step": 1, "config": cfg.to_dict()}
    folder = checkpoint.save(run_dir, 1, saved, saved_optimizer, topo, meta)  # collective
    reference, reference_optimizer = build(0, 1, None)  # every expert, marked as the saved ones
    marked(reference, reference_optimizer)

    contiguous, contiguous_optimizer = build(ep_rank, 2, None)
    checkpoint.restore(folder, contiguous, contiguous_optimizer, topo, lambda message: None)  # collective
    wrong = topo.gather_to_root(mismatches(contiguous, contiguous_optimizer, reference))
    if topo.is_root:
        whole, whole_optimizer = build(0, 1, None)
        checkpoint.restore(folder, whole, whole_optimizer, Topology.single_process(), lambda message: None)
        marker = json.loads((folder / checkpoint.MARKER).read_text())
        with open(out_path, "w") as f:
            json.dump({"contiguous_wrong": [w for part in wrong for w in part],
                       "whole_wrong": mismatches(whole, whole_optimizer, reference),
                       "experts_restored": sum(len(layer.experts) for layer in whole.moe_layers),
                       "expert_files": marker["expert_files"],
                       "mine": [layer.local_experts() for layer in contiguous.moe_layers]}, f)
    topo.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
