"""The ASE calculator: exact derivatives (ASE's own finite differences), float32/float64, heads,
loading a checkpoint written by the trainer, and the ASE drivers users run (BFGS, NVE MD)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from exaforce.calculator import ExaforceCalculator
from exaforce.config import Config, ConfigError, DataConfig, model_preset
from exaforce.model.potential import Potential

pytestmark = pytest.mark.inference
ELEMENTS = ("H", "C", "O", "Cu", "Au")


def alloy(rattle: float = 0.07) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.65).repeat((2, 2, 2))
    atoms.numbers[[0, 3, 5]] = 79
    atoms.rattle(rattle, seed=2)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + [[0.01, 0.02, 0], [0.02, -0.01, 0], [0, 0, 0.015]]),
                   scale_atoms=True)
    return atoms


def calculator(dtype: str = "float64", scale: float = 0.8, **kwargs) -> ExaforceCalculator:
    calc = ExaforceCalculator.from_preset("small", seed=1, dtype=dtype, elements=ELEMENTS, **kwargs)
    calc.model.energy_scale_H.fill_(scale)  # forces of a useful size from random weights
    return calc


@pytest.mark.parametrize("preset", ["small", "small-moe"])
def test_forces_and_stress_match_ase_finite_differences(preset):
    """float64: −∂E/∂r and (1/V)·∂E/∂ε against ASE's central differences (tolerances: FD truncation)."""
    calc = ExaforceCalculator.from_preset(preset, seed=3, dtype="float64", elements=ELEMENTS)
    calc.model.energy_scale_H.fill_(5.0)
    atoms = alloy()
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3  # a test of something
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-5), atol=1e-7)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-6), atol=1e-8)


def test_molecule_has_forces_but_no_stress():
    atoms = molecule("CH3CH2OH")
    atoms.calc = calculator(scale=5.0)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-5), atol=1e-7)
    np.testing.assert_allclose(atoms.get_forces().sum(0), 0.0, atol=1e-10)  # no external force
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_float32_agrees_with_float64_and_with_its_own_finite_differences():
    atoms = alloy()
    results = {}
    for dtype in ("float32", "float64"):
        a = atoms.copy()
        a.calc = calculator(dtype, scale=5.0)
        results[dtype] = (a.get_potential_energy(), a.get_forces(), a.get_stress())
        assert a.calc.model.embedding.weight.dtype == getattr(torch, dtype)
    (e32, f32, s32), (e64, f64, s64) = results["float32"], results["float64"]
    assert e32 == pytest.approx(e64, rel=1e-5)  # float32 rounding over a few thousand terms
    np.testing.assert_allclose(f32, f64, atol=2e-5)
    np.testing.assert_allclose(s32, s64, atol=2e-6)
    a = atoms.copy()
    a.calc = calculator("float32", scale=5.0)
    # float32 finite differences: eps large enough to beat rounding (1e-7 of ~30 eV), small enough for curvature
    np.testing.assert_allclose(a.get_forces(), calculate_numerical_forces(a, eps=1e-3), atol=5e-3)


def test_head_choice():
    cfg = dataclasses.replace(model_preset("small"), elements=ELEMENTS, heads=("pbe", "r2scan"))
    torch.manual_seed(0)
    model = Potential(cfg)
    model.energy_scale_H.copy_(torch.tensor([1.0, 3.0]))
    model.reference_energy_HX[1].fill_(-1.0)
    energies = {}
    for head in ("pbe", "r2scan"):
        atoms = alloy()
        atoms.calc = ExaforceCalculator(Potential(cfg), head=head)  # a fresh copy: the calculator takes it over
        atoms.calc.model.load_state_dict(model.state_dict())
        energies[head] = atoms.get_potential_energy()
        np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-5), atol=1e-7)
    assert abs(energies["pbe"] - energies["r2scan"]) > 1.0  # reference −1 eV × 8 atoms and another scale
    assert ExaforceCalculator(Potential(cfg)).head == "pbe"  # default: the first head
    with pytest.raises(ValueError, match=r"head 'b97': this model's heads are \['pbe', 'r2scan'\]"):
        ExaforceCalculator(Potential(cfg), head="b97")


def test_unknown_element_and_dtype_are_clear_errors():
    atoms = bulk("Fe", "bcc", a=2.87)
    atoms.calc = calculator()
    with pytest.raises(ValueError, match=r"elements \['Fe'\] are not in this model's elements"):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match="dtype 'float16'"):
        calculator(dtype="float16")


def test_from_checkpoint_file_and_run_folder(tmp_path):
    """A single-file model as the trainer exports it ({step, config, model}) gives back the same
    potential, by file and by run folder; a missing one is a clear error. (Checkpoints written by a
    real training run: tests/mpi/test_predict.py, tests/integration/test_finetune_transfer.py.)"""
    from exaforce import checkpoint

    cfg = Config(model=dataclasses.replace(model_preset("small"), elements=ELEMENTS, heads=("a", "b")),
                 data=DataConfig(train=("unused.bp",)))
    torch.manual_seed(4)
    model = Potential(cfg.model)
    model.energy_scale_H.fill_(2.0)
    model.reference_energy_HX.normal_()
    path = tmp_path / "run/checkpoints/step-00000007.pt"
    checkpoint.save_atomic({"step": 7, "config": cfg.to_dict(), "model": model.state_dict()}, path)
    atoms = alloy()
    expected = ExaforceCalculator(model, head="b").get_potential_energy(atoms)
    for where in (path, tmp_path / "run"):
        calc = ExaforceCalculator.from_checkpoint(where, head="b")
        assert calc.model.cfg == cfg.model
        assert calc.get_potential_energy(atoms) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        ExaforceCalculator.from_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="run folder without a complete checkpoint"):
        (tmp_path / "empty/checkpoints").mkdir(parents=True)
        ExaforceCalculator.from_checkpoint(tmp_path / "empty")


def test_run_folder_means_its_newest_checkpoint(tmp_path):
    """A complete checkpoint folder newer than the export is read; at one step the export wins (one
    read); a folder without its COMPLETE marker is not a checkpoint."""
    import json

    from exaforce import checkpoint

    cfg = Config(model=dataclasses.replace(model_preset("small"), elements=ELEMENTS), data=DataConfig(train=("u.bp",)))
    root = tmp_path / "run/checkpoints"
    checkpoint.save_atomic({"step": 7, "config": cfg.to_dict(), "model": Potential(cfg.model).state_dict()},
                           root / "step-00000007.pt")
    for step, marker in ((9, True), (12, False)):
        folder = checkpoint.step_folder(tmp_path / "run", step)
        checkpoint.save_atomic({"model": Potential(cfg.model).state_dict(), "optimizer": {},
                                "meta": {"step": step, "config": cfg.to_dict()}}, folder / "dense.pt")
        if marker:
            sizes = {"dense.pt": (folder / "dense.pt").stat().st_size}
            (folder / checkpoint.MARKER).write_text(json.dumps({"files": sizes}))
    assert checkpoint.latest(tmp_path / "run") == root / "step-00000009"
    assert checkpoint.latest(tmp_path / "run", model_files=True) == root / "step-00000009"
    assert ExaforceCalculator.from_checkpoint(tmp_path / "run").model.cfg == cfg.model
    checkpoint.export_model(root / "step-00000009", root / "step-00000009.pt")
    assert checkpoint.latest(tmp_path / "run") == root / "step-00000009"  # --resume needs the optimizer state
    assert checkpoint.latest(tmp_path / "run", model_files=True) == root / "step-00000009.pt"


def test_from_preset_leaves_the_callers_random_stream_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    calculator()
    assert torch.equal(torch.rand(3), expected)


def test_bfgs_relaxation_converges():
    """Positions relax to |F| < 0.01 eV/Å, the energy going down (random weights, float64).

    A random model's landscape need not have a minimum at physical distances: scaled ×30 or more,
    this one pulls atoms 1 and 4 together until the calculator refuses them as coincident (a clear
    error, as it should); ×10 relaxes to a minimum with every pair above 2.1 Å."""
    atoms = alloy(rattle=0.1)
    atoms.calc = calculator(scale=10.0)
    e0 = atoms.get_potential_energy()
    f0 = np.linalg.norm(atoms.get_forces(), axis=1).max()
    energies = []
    optimizer = BFGS(atoms, logfile=None)
    optimizer.attach(lambda: energies.append(atoms.get_potential_energy()))
    assert optimizer.run(fmax=0.01, steps=200)
    assert f0 > 0.012 and np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.01
    assert energies[-1] < e0


def test_nve_molecular_dynamics_conserves_energy():
    """Velocity Verlet, 1 fs, 60 steps from 300 K: the total energy moves < 0.1% as much as the kinetic."""
    atoms = alloy(rattle=0.05)
    atoms.calc = calculator(scale=100.0)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    total, kinetic = [], []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.attach(lambda: (total.append(atoms.get_total_energy()), kinetic.append(atoms.get_kinetic_energy())))
    dyn.run(60)
    assert np.ptp(kinetic) > 0.01  # the atoms moved and exchanged energy
    assert np.ptp(total) < 1e-3 * np.ptp(kinetic)
