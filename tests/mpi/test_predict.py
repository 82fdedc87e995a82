"""`exaforce predict` under mpiexec: 1, 2 and 4 ranks write bit-identical predictions, equal to the
ASE calculator's; the output keeps the input's schema; bad requests fail on every rank with nothing written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule

from conftest import run_mpi

pytestmark = [pytest.mark.inference, pytest.mark.mpi]
ELEMENTS = ("H", "C", "N", "O", "Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
N_METALS = 11


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """11 EMT cells + 3 molecules (no stress) as one BP5 dataset with a charge column, and a two-head
    model trained on it for 2 steps by `exaforce train` (whatever checkpoint layout the trainer writes)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from exaforce.io.bp import write_bp
    from exaforce.io.schema import Frames
    from exaforce.io.synth import synthesize

    tmp = tmp_path_factory.mktemp("predict")
    atoms = synthesize(N_METALS, seed=5)
    for name in ("CH4", "H2O", "CH3CH2OH"):
        m = molecule(name)
        m.calc = SinglePointCalculator(m, energy=-10.0 * len(m), forces=np.zeros((len(m), 3)))
        atoms.append(m)
    for i, a in enumerate(atoms):
        a.info["charge"] = float(i % 2)
    write_bp(Frames.from_atoms(atoms), tmp / "d.bp", "mixed", {"source": "test"}, method="EMT")
    (tmp / "train.toml").write_text(f"""
[run]
out_dir = "{tmp / 'run'}"
steps = 2
[data]
global_batch_size = 4
[[data.datasets]]
path = "{tmp / 'd.bp'}"
head = "pbe"
[model]
preset = "small"
elements = {list(ELEMENTS)!r}
heads = ["emt", "pbe"]
""".replace("'", '"'))
    proc = run_mpi(1, ["-m", "exaforce.cli", "train", "--config", str(tmp / "train.toml")], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def predict(work: Path, ranks: int, out: str, *extra: str) -> subprocess.CompletedProcess:
    return run_mpi(ranks, ["-m", "exaforce.cli", "predict", "--checkpoint", str(work / "run"), "--data",
                           str(work / "d.bp"), "--out", str(work / out), *extra], timeout=180)


def read(path: Path):
    from exaforce.io.bp import open_bp

    with open_bp(path) as d:
        return d.read(0, d.n_structures), d.attrs


def test_ranks_write_identical_numbers_and_the_input_schema(work):
    """Batches of 4 over 14 structures: 4 batches on 1, 2 (2 + 2) and 4 ranks (1 each), float64."""
    outputs = {}
    for ranks in (1, 2, 4):
        proc = predict(work, ranks, f"p{ranks}.bp", "--batch-size", "4", "--dtype", "float64", "--head", "pbe",
                       "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["ranks"] == ranks and summary["structures"] == 14 and summary["head"] == "pbe"
        assert summary["structures_per_s"] > 0 and summary["atoms_per_s"] > summary["structures_per_s"]
        assert "structures/s" in proc.stdout and "atoms/s" in proc.stdout
        outputs[ranks] = read(work / f"p{ranks}.bp")
    one, attrs = outputs[1]
    for ranks in (2, 4):
        other, _ = outputs[ranks]
        for field in ("energy_S", "forces_N3", "stress_S6"):  # exact: same batches, whatever the rank count
            assert np.array_equal(getattr(one, field), getattr(other, field), equal_nan=True), (ranks, field)
    source, source_attrs = read(work / "d.bp")
    for field in ("numbers_N", "positions_N3", "cell_S33", "pbc_S3", "natoms_S", "charge_S"):
        assert np.array_equal(getattr(one, field), getattr(source, field)), field
    assert one.magmoms_N is None
    assert not np.array_equal(one.energy_S, source.energy_S)
    assert np.isnan(one.stress_S6[N_METALS:]).all() and np.isfinite(one.stress_S6[:N_METALS]).all()
    from exaforce.model_io import load_trained

    assert attrs["method"] == f"exaforce:{load_trained(work / 'run').path.resolve()}"
    assert attrs["name"] == "mixed" and attrs["source"] == "test" and attrs["head"] == "pbe"
    assert attrs["predicted_from"] == str((work / "d.bp").resolve()) and attrs["schema_version"] == source_attrs[
        "schema_version"]


def test_graph_parallel_predictions_equal_one_rank(work):
    """--gp 2 on 2 ranks (one group) and on 4 ranks (two groups, two batches each; ghost halo, then the
    per-block exchange): every structure's atoms split over its group; float64 energies, forces and stresses equal one rank's to 1e-10
    relative (sums over the group change the last bits only); a --gp that does not divide the ranks fails."""
    reference = predict(work, 1, "gp-ref.bp", "--batch-size", "4", "--dtype", "float64")
    assert reference.returncode == 0, reference.stderr[-3000:]
    want, _ = read(work / "gp-ref.bp")
    for ranks, halo in ((2, "ghost"), (4, "ghost"), (4, "exchange")):
        proc = predict(work, ranks, f"gp{ranks}{halo}.bp", "--batch-size", "4", "--dtype", "float64", "--gp", "2",
                       "--gp-halo", halo, "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{ranks // 2} group(s) of 2 ranks" in proc.stdout
        assert json.loads(proc.stdout.strip().splitlines()[-1])["gp"] == 2
        got, _ = read(work / f"gp{ranks}{halo}.bp")
        for key in ("energy_S", "forces_N3", "stress_S6"):
            a, b = np.nan_to_num(getattr(got, key)), np.nan_to_num(getattr(want, key))
            assert np.abs(a - b).max() <= 1e-10 * np.abs(b).max(), key
    bad = predict(work, 4, "gp3.bp", "--gp", "3")
    assert bad.returncode != 0 and "does not divide the world size 4" in bad.stderr
    assert not (work / "gp3.bp").exists()


def test_predictions_equal_the_calculator(work):
    """float64, any batch size: each structure as the ASE calculator gives it alone (summation order
    differs between batch compositions, so to 1e-10, not bitwise)."""
    from exaforce.calculator import ExaforceCalculator

    proc = predict(work, 2, "p-b5.bp", "--batch-size", "5", "--dtype", "float64", "--head", "pbe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred, _ = read(work / "p-b5.bp")
    calc = ExaforceCalculator.from_checkpoint(work / "run", head="pbe")
    for s, atoms in enumerate(pred.to_atoms()):
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(pred.energy_S[s], rel=1e-10, abs=1e-10)
        lo = pred.offsets_S[s]
        np.testing.assert_allclose(atoms.get_forces(), pred.forces_N3[lo:lo + len(atoms)], atol=1e-10)
        if atoms.pbc.all():
            np.testing.assert_allclose(atoms.get_stress(), pred.stress_S6[s], atol=1e-12)


def test_bad_requests_fail_on_every_rank_and_write_nothing(work):
    proc = predict(work, 2, "p-exists.bp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = sorted(p.name for p in work.iterdir())
    cases = [
        ((2, "p-exists.bp"), "already exists (pass --overwrite"),
        ((2, "d.bp"), "is the input dataset"),
        ((2, "x.bp", "--head", "b97"), "head 'b97': this model's heads are ['emt', 'pbe']"),
        ((1, "x.bp", "--batch-size", "0"), "--batch-size 0: must be >= 1"),
        ((2, "x.bp", "--device", "cuda"), "--device = 'cuda': this rank sees no cuda device"),  # no GPU here
    ]
    for (ranks, *args), message in cases:
        proc = predict(work, ranks, *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-2000:])
    proc = run_mpi(2, ["-m", "exaforce.cli", "predict", "--checkpoint", str(work / "nope.pt"), "--data",
                       str(work / "d.bp"), "--out", str(work / "x.bp")], timeout=120)
    assert proc.returncode != 0 and "nope.pt: no such checkpoint" in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == before  # no output, no temp directory left


def test_unknown_element_names_the_sample(work, tmp_path):
    """A structure the model cannot evaluate stops the job on every rank; nothing is written."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from exaforce.io.bp import write_bp
    from exaforce.io.schema import Frames

    atoms = [molecule(n) for n in ("CH4", "H2O", "CH4", "PH3")]  # P: not in the model's elements
    for a in atoms:
        a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
    write_bp(Frames.from_atoms(atoms), tmp_path / "p.bp", "p", method="none")
    proc = run_mpi(2, ["-m", "exaforce.cli", "predict", "--checkpoint", str(work / "run"), "--data",
                       str(tmp_path / "p.bp"), "--out", str(tmp_path / "o.bp"), "--batch-size", "1"], timeout=120)
    assert proc.returncode != 0 and "frame 3" in proc.stderr and "Z=15" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o.bp").exists() and [p.name for p in tmp_path.iterdir()] == ["p.bp"]


def test_batch_plan_is_contiguous_balanced_and_rank_independent():
    from exaforce.predict import batch_plan

    natoms = np.array([1, 8, 2, 2, 30, 1, 1, 4, 4, 4, 16])
    for world in (1, 2, 3, 4, 16):
        plan = batch_plan(natoms, 3, world)
        starts = np.concatenate(plan)
        assert np.array_equal(starts, np.arange(0, 11, 3))  # the same batches, in order, each once
    counts = [len(p) for p in batch_plan(np.ones(100, int), 10, 4)]  # equal atoms: 10 batches over 4 ranks
    assert sum(counts) == 10 and max(counts) - min(counts) <= 1
    heavy = batch_plan(np.r_[np.full(10, 50), np.ones(90, int)], 10, 2)  # first batch: 500 of 590 atoms
    assert [len(p) for p in heavy] == [1, 9]


def test_bench_predict_json_line():
    """`exaforce bench predict` as a user runs it (sizes and format only; speed is shown, never asserted)."""
    from conftest import run_cli

    proc = run_cli(["bench", "predict", "--preset", "small", "--structures", "12", "--batch-size", "4",
                    "--repeats", "1", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ranks_identical"] is True and result["reference"] is None
    assert set(result["exaforce"]) == {"1", "2"} and result["exaforce"]["2"]["atoms_per_s"] > 0


def test_model_info_describes_the_model_file_without_building_it(work):
    """`exaforce model info --checkpoint` on the run folder, its checkpoint folder and its model file."""
    import torch

    from conftest import run_cli
    from exaforce import __version__
    from exaforce.model_io import load_trained

    folder = sorted((work / "run/checkpoints").glob("step-*[0-9]"))[-1]
    infos = []
    for target in (work / "run", folder, folder.with_suffix(".pt")):
        proc = run_cli(["model", "info", "--checkpoint", str(target), "--json"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        infos.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    state = load_trained(folder).state
    for info in infos:
        assert info["elements"] == list(ELEMENTS) and list(info["heads"]) == ["emt", "pbe"]
        assert (info["cutoff_a"], info["three_body_cutoff_a"], info["blocks"]) == (6.0, 4.0, 2)
        assert info["receptive_field_a"] == 14.0  # (2 - 1) × 6 + max(6, 2 × 4) and info["units"]["forces"] == "eV/Å"
        assert info["written_by"] == {"exaforce": __version__, "torch": torch.__version__} and info["step"] == 2
        assert info["heads"]["pbe"]["reference_energy_ev"]["Cu"] == pytest.approx(
            float(state["reference_energy_HX"][1, ELEMENTS.index("Cu")]))
        assert info["model_config"]["width"] == 16
    text = run_cli(["model", "info", "--checkpoint", str(work / "run")]).stdout
    assert "receptive_field_a: 14.0" in text and "head pbe: energy scale" in text


def test_a_safetensors_export_describes_itself_and_predicts_what_the_torch_file_does(work, tmp_path):
    """`exaforce model export --out F.safetensors`: a plain safetensors reader sees the weights and the
    description; `model info` and `predict` read it and give what the run's own .pt model file gives."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from conftest import run_cli

    out = tmp_path / "model.safetensors"
    proc = run_cli(["model", "export", "--checkpoint", str(work / "run"), "--out", str(out)])
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-2000:]
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "exaforce-model-1" and meta["step"] == "2"
        assert json.loads(meta["config"])["model"]["heads"] == ["emt", "pbe"]
        assert "reference_energy_HX" in f.keys()
    model_file = sorted((work / "run/checkpoints").glob("step-*.pt"))[-1]
    infos = [json.loads(run_cli(["model", "info", "--checkpoint", str(p), "--json"]).stdout.strip().splitlines()[-1])
             for p in (model_file, out)]
    described = [{k: v for k, v in info.items() if k != "file"} for info in infos]
    assert described[0] == described[1]
    outputs = []
    for checkpoint, name in ((model_file, "from-pt.bp"), (out, "from-st.bp")):
        proc = run_mpi(1, ["-m", "exaforce.cli", "predict", "--checkpoint", str(checkpoint), "--data",
                           str(work / "d.bp"), "--out", str(tmp_path / name), "--dtype", "float64"], timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(read(tmp_path / name)[0])
    assert np.array_equal(outputs[0].forces_N3, outputs[1].forces_N3)
    assert np.array_equal(outputs[0].energy_S, outputs[1].energy_S)

    again = run_cli(["model", "export", "--checkpoint", str(work / "run"), "--out", str(out)])
    assert again.returncode == 2 and "already exists (pass --overwrite" in again.stderr
    assert run_cli(["model", "export", "--checkpoint", str(work / "run"), "--out", str(out), "--overwrite"]).returncode == 0
    wrong = run_cli(["model", "export", "--checkpoint", str(work / "run"), "--out", str(tmp_path / "m.bin")])
    assert wrong.returncode == 2 and "must end in .safetensors, .pt or .pt2" in wrong.stderr
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    refused = run_cli(["model", "info", "--checkpoint", str(foreign)])
    assert refused.returncode == 2 and "not an exaforce model file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_pt2_export_for_compiled_md_codes_carries_its_description(work, tmp_path):
    """`exaforce model export --out F.pt2 --head pbe`: a torch.export archive whose extra/exaforce.json
    says what the inputs mean (numerics: tests/unit/test_program.py); an unknown head is refused."""
    import torch

    from conftest import run_cli

    out = tmp_path / "model.pt2"
    proc = run_cli(["model", "export", "--checkpoint", str(work / "run"), "--out", str(out), "--head", "pbe"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = {"exaforce.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    meta = json.loads(extra["exaforce.json"])
    assert meta["head"] == "pbe" and meta["dtype"] == "float64" and meta["elements"] == list(ELEMENTS)
    assert meta["receptive_field_a"] == 14.0 and meta["inputs"][-1] == "own_N"
    assert len(program.graph_signature.user_inputs) == 5
    bad = run_cli(["model", "export", "--checkpoint", str(work / "run"), "--out", str(tmp_path / "x.pt2"),
                   "--head", "r2scan"])
    assert bad.returncode == 2 and "--head: head 'r2scan': this model's heads are ['emt', 'pbe']" in bad.stderr
    assert not (tmp_path / "x.pt2").exists()
