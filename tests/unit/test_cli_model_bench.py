"""`exaforce model info` and `exaforce bench step` as a user runs them (sizes and output format only;
speed targets are shown by the benchmark itself, never by a timed test)."""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.cli


def test_base_preset_is_matris_10m_sized():
    proc = run_cli(["model", "info", "--preset", "base", "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (info["width"], info["blocks"], info["cutoff"], info["three_body_cutoff"]) == (128, 10, 6.0, 4.0)
    assert abs(info["params"] - 10.4e6) / 10.4e6 < 0.10


def gated_mlp_params(in_dim: int, hidden: int, out_dim: int) -> int:
    return in_dim * 2 * hidden + 2 * hidden + hidden * out_dim + out_dim


def test_moe_1b_preset_has_a_billion_parameters_and_reports_active_ones():
    proc = run_cli(["model", "info", "--preset", "moe-1b", "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    d, blocks, experts, k = info["width"], info["blocks"], info["experts"], info["top_k"]
    edge_expert = gated_mlp_params(3 * d, info["edge_mlp_ratio"] * d, d)
    node_expert = gated_mlp_params(3 * d, info["node_mlp_ratio"] * d, d)
    assert info["expert_params"] == blocks * experts * (edge_expert + node_expert)  # counted independently
    assert info["params"] == info["dense_params"] + info["expert_params"] >= 1.0e9
    assert info["active_params_per_atom"] == info["dense_params"] + blocks * k * (edge_expert + node_expert)


def test_unknown_preset_is_a_clear_error():
    proc = run_cli(["model", "info", "--preset", "huge"])
    assert proc.returncode == 2 and "model.preset = 'huge': unknown" in proc.stderr


# the default workload (dense cells), one worker per batch size 1 and 2: ~25 s
def test_bench_step_json_line():
    proc = run_cli(["bench", "step", "--preset", "small", "--batches", "1,2", "--warmup", "1", "--repeats", "2",
                    "--compare", "store", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("atoms_per_s", "peak_mem_bytes", "flops_per_s", "peak_flops_per_s", "references"):
        assert key in result
    assert result["atoms_per_s"] > 0 and result["flops_per_s"] > 0 and list(result["references"]) == ["store"]
    store = result["references"]["store"]
    assert [r["recompute_lines"] for r in result["batches"]] == [result["recompute_lines"]] * 2
    assert [(r["structures"], r["recompute_lines"]) for r in store["batches"]] == [(1, 0), (2, 0)]
    assert store["atoms_per_s"] > 0 and store["peak_mem_slope_bytes_per_atom"] is not None


def test_bench_step_rejects_an_unknown_comparison():
    proc = run_cli(["bench", "step", "--compare", "store,nequip"])
    assert proc.returncode != 0 and "unknown nequip (known: store, sums, kept, matris, mace)" in proc.stderr


def test_dense_workload_cells_are_32_to_108_atom_periodic_labelled_and_seeded():
    from exaforce.bench.workloads import dense_cells

    cells = dense_cells(6, seed=3)
    again = dense_cells(6, seed=3)
    assert [len(a) for a in dense_cells(3, seed=3)] == [len(a) for a in cells[:3]]  # batch sizes nest
    for a, b in zip(cells, again):
        assert 32 <= len(a) <= 108 and a.pbc.all() and a.cell.volume > 0
        assert set(a.get_chemical_symbols()) <= {"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"}
        assert a.calc.results["forces"].shape == (len(a), 3) and a.calc.results["stress"].shape == (6,)
        assert a == b and a.get_potential_energy() == b.get_potential_energy()
    assert any(a.get_positions()[0].tolist() != b.get_positions()[0].tolist()
               for a, b in zip(cells, dense_cells(6, seed=4)))


def test_bench_step_worker_takes_its_baseline_before_any_step_and_counts_flops_last(monkeypatch):
    import exaforce.bench.step as bench
    import exaforce.perf.flops
    import exaforce.training.step

    events = []
    real_rss, real_step = bench._vm_rss_bytes, exaforce.training.step.train_step
    real_count = exaforce.perf.flops.count_flops
    monkeypatch.setattr(bench, "_vm_rss_bytes", lambda: events.append("baseline") or real_rss())
    monkeypatch.setattr(exaforce.training.step, "train_step", lambda *a: events.append("step") or real_step(*a))
    monkeypatch.setattr(exaforce.perf.flops, "count_flops", lambda fn: events.append("flops") or real_count(fn))
    record = bench.exaforce_worker("small", "small", 1, "float32", 1, 2)
    assert events == ["baseline", "step", "step", "step", "flops", "step"]
    assert 0 < record["start_rss_bytes"] <= record["baseline_rss_bytes"] <= record["peak_rss_bytes"]
    assert record["peak_mem_bytes"] == record["peak_rss_bytes"]
    assert record["step_mem_bytes"] == record["peak_rss_bytes"] - record["baseline_rss_bytes"]
    assert record["flops"] > 0 and record["graph_build_s_per_structure"] > 0


def test_bench_step_small_workload_one_batch_reports_true_peak_beside_baseline():
    proc = run_cli(["bench", "step", "--preset", "small", "--workload", "small", "--batch", "2", "--warmup", "1",
                    "--repeats", "1", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = result["batches"]
    assert row["structures"] == result["batch"] == 2 and result["workload"] == "small"
    assert 0 < row["start_rss_bytes"] <= row["baseline_rss_bytes"] <= row["peak_rss_bytes"] == result["peak_mem_bytes"]
    assert result["step_mem_bytes"] == result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    for key in ("graph_build_s_per_structure", "flops_per_atom", "flops_per_edge", "flops_per_angle", "edges"):
        assert result[key] > 0
    assert result["peak_mem_slope_bytes_per_atom"] is None  # one batch size: no fit


def test_bench_step_out_of_memory_batch_is_reported_not_fatal():
    proc = run_cli(["bench", "step", "--preset", "small", "--workload", "small", "--batches", "1,2", "--warmup", "0",
                    "--repeats", "1", "--mem-limit-gib", "0.5", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["structures"], r["oom"]) for r in result["batches"]] == [(1, True), (2, True)]
    assert result["largest_batch_ran"] is None and "out of memory (cap 0.5 GiB)" in proc.stderr + proc.stdout


def test_memory_fit_is_the_least_squares_line_over_the_batches_that_ran():
    from exaforce.bench.step import memory_fit

    rows = [{"atoms": 10, "peak": 1000.0}, {"atoms": 20, "peak": 1500.0}, {"atoms": 40, "peak": 2500.0},
            {"structures": 8, "oom": True}]
    slope, intercept = memory_fit(rows, "peak")
    assert abs(slope - 50.0) < 1e-9 and abs(intercept - 500.0) < 1e-6
    assert memory_fit(rows[:1], "peak") is None


def test_bench_accuracy_logs_the_overrides_it_runs(tmp_path):
    from exaforce.bench.accuracy import overrides_text, read_overrides, run_config

    path = tmp_path / "candidate.toml"
    path.write_text("[model]\nnode_mlp_ratio = 4\nblock = \"light\"\n[loss]\nstress_weight = 0.001\n")
    overrides = read_overrides(path)
    cfg = run_config(overrides, tmp_path / "train.bp", tmp_path / "run", 60.0, 1)
    assert (cfg.model.node_mlp_ratio, cfg.loss.stress_weight) == (4, 0.001)
    assert overrides_text(overrides) == "model.node_mlp_ratio = 4, model.block = 'light', loss.stress_weight = 0.001"
    assert overrides_text({}) == "nothing"


@pytest.mark.parametrize("text, message", [(None, "no such config file"), ("[model\n", "not valid TOML"),
                                           ("model = 3\n", "model: must be a table"),
                                           ("[model]\nwidht = 8\n", "model.widht: unknown key"),
                                           ("[data]\ntrain = []\n", "the data are the benchmark's")])
def test_bench_accuracy_refuses_a_bad_config_file_before_any_work(tmp_path, monkeypatch, text, message):
    from exaforce.bench import accuracy
    from exaforce.config import ConfigError

    monkeypatch.setattr(accuracy, "make_data", lambda *_: pytest.fail("data generated for a bad config"))
    path = tmp_path / "candidate.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        accuracy.bench_accuracy(60.0, [0], path, 2, [], lambda line: None)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("budget, compare, message", [(0.0, [], "--budget 0.0"), (60.0, ["nequip"], "--compare nequip")])
def test_bench_accuracy_refuses_bad_arguments(budget, compare, message):
    from exaforce.bench.accuracy import bench_accuracy
    from exaforce.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        bench_accuracy(budget, [0], None, 2, compare, lambda line: None)
