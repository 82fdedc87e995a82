"""Fine-tuning without training: weights copied by name, heads matched by name, a new head as the
mean of the old ones, the backbone frozen, shape mismatches refused; run.init_from / run.freeze."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from exaforce import config
from exaforce.config import ConfigError, model_preset
from exaforce.finetune import check_compatible, copy_weights, freeze_backbone
from exaforce.graph import batch_from_atoms
from exaforce.model.potential import Potential, energy_forces_stress
from exaforce.model_io import TrainedModel

pytestmark = pytest.mark.inference
ELEMENTS = ("Cu", "Au", "Ni")


def trained(preset: str, heads: tuple[str, ...], seed: int = 0) -> TrainedModel:
    cfg = dataclasses.replace(model_preset(preset), elements=ELEMENTS, heads=heads)
    torch.manual_seed(seed)
    model = Potential(cfg).double()
    model.energy_scale_H.uniform_(0.5, 2.0)
    model.reference_energy_HX.normal_()
    return TrainedModel(path=Path("ckpt.pt"), step=10, config=cfg, state=model.state_dict())


def energy_and_forces(model: Potential, head: int) -> tuple[float, np.ndarray]:
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    atoms.numbers[1] = 79
    atoms.rattle(0.05, seed=1)
    batch = batch_from_atoms([atoms], model.species_table(), model.cfg.cutoff, model.cfg.three_body_cutoff,
                             head, len(model.cfg.heads)).to("cpu", torch.float64)
    pred = energy_forces_stress(model, batch, training=False)
    return float(pred.energy_G[0].detach()), pred.forces_N3.detach().numpy()


@pytest.mark.parametrize("preset", ["small", "small-moe"])
@pytest.mark.parametrize("old_heads", [("emt",), ("emt", "pbe")])
def test_inherited_heads_predict_what_the_checkpoint_did(preset, old_heads):
    """New heads added in front and behind: every checkpoint head gives the checkpoint's energy and
    forces, bitwise up to float64 summation (the new head embedding rows do not touch old heads)."""
    ckpt = trained(preset, old_heads)
    old = Potential(ckpt.config).double()
    old.load_state_dict(ckpt.state)
    new_cfg = dataclasses.replace(ckpt.config, heads=("gfn2", *old_heads[::-1], "xtb"))
    torch.manual_seed(99)
    new = Potential(new_cfg).double()
    new.energy_scale_H.fill_(3.0)      # what the trainer's fit would leave for the new heads
    new.reference_energy_HX.fill_(-2.0)
    copy_weights(new, ckpt)
    for h, name in enumerate(old_heads):
        e_old, f_old = energy_and_forces(old, h)
        e_new, f_new = energy_and_forces(new, new_cfg.heads.index(name))
        assert e_new == pytest.approx(e_old, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(f_new, f_old, atol=1e-12)
    g = new_cfg.heads.index("gfn2")
    assert new.energy_scale_H[g] == 3.0 and bool((new.reference_energy_HX[g] == -2.0).all())  # fitted, kept
    readout_rows = torch.stack([ckpt.state["readout.down.weight"][i] for i in range(len(old_heads))])
    torch.testing.assert_close(new.readout.down.weight[g], readout_rows.mean(0))


def test_freeze_backbone_leaves_readout_and_head_embeddings():
    ckpt = trained("small-moe", ("emt", "pbe"))
    model = Potential(ckpt.config).double()
    n = freeze_backbone(model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert all(name.startswith(("readout", "head_embedding")) or name.endswith("router.head_embedding.weight")
               for name in trainable)
    assert {"readout.down.weight", "readout_norm.weight", "head_embedding.weight",
            "blocks.0.node_update.mlp.router.head_embedding.weight"} <= set(trainable)
    assert not model.embedding.weight.requires_grad and not model.blocks[0].edge_scale.requires_grad


def test_shape_mismatch_and_dropped_heads_are_clear_errors():
    ckpt = trained("small", ("emt",))
    with pytest.raises(ConfigError, match=r"model.width = 32 \(the checkpoint's: 16\)"):
        check_compatible(ckpt, dataclasses.replace(ckpt.config, width=32))
    with pytest.raises(ConfigError, match=r"model.elements = .*\(the checkpoint's: \('Cu', 'Au', 'Ni'\)\)"):
        check_compatible(ckpt, dataclasses.replace(ckpt.config, elements=("Cu", "Au")))
    with pytest.raises(ConfigError, match=r"must keep the checkpoint's heads \['emt'\] \(missing \['emt'\]\)"):
        check_compatible(ckpt, dataclasses.replace(ckpt.config, heads=("pbe",)))
    check_compatible(ckpt, dataclasses.replace(ckpt.config, heads=("pbe", "emt")))  # adding is fine


def test_restore_and_fine_tuning_share_one_comparison():
    """Restore wants the very model (heads included); a saved config's lists equal the tuples."""
    from types import SimpleNamespace

    from exaforce.checkpoint import CheckpointError, _check_model_config

    ckpt = trained("small", ("emt",))
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ckpt.config).items()}
    _check_model_config(Path("ckpt"), saved, SimpleNamespace(cfg=ckpt.config))
    wider = dataclasses.replace(ckpt.config, width=32, heads=("emt", "pbe"))
    with pytest.raises(CheckpointError, match=r"^ckpt: the checkpoint's model differs from this config's: "
                       r"model.heads = \['emt'\] in the checkpoint, \['emt', 'pbe'\] now; "
                       r"model.width = 16 in the checkpoint, 32 now$"):
        _check_model_config(Path("ckpt"), saved, SimpleNamespace(cfg=wider))
    with pytest.raises(ConfigError, match=r"^run.init_from = 'ckpt.pt': the model differs from the checkpoint's: "
                       r"model.width = 32 \(the checkpoint's: 16\)$"):
        check_compatible(ckpt, wider)


def test_config_init_from_and_freeze(tmp_path):
    (tmp_path / "ft.toml").write_text('[data]\ntrain = ["d.bp"]\n[run]\ninit_from = "pre/run"\nfreeze = "backbone"\n')
    cfg = config.load(tmp_path / "ft.toml")
    assert cfg.run.init_from == str(tmp_path / "pre/run") and cfg.run.freeze == "backbone"  # beside the config
    assert config.from_dict({"data": {"train": ["d.bp"]}}).run.init_from == ""
    with pytest.raises(ConfigError, match="run.freeze = 'all'"):
        config.from_dict({"data": {"train": ["d.bp"]}, "run": {"init_from": "x", "freeze": "all"}})
    with pytest.raises(ConfigError, match=r"run.freeze = 'backbone'.*with run.init_from"):
        config.from_dict({"data": {"train": ["d.bp"]}, "run": {"freeze": "backbone"}})
