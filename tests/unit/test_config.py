import pytest

from exaforce import config


def base() -> dict:
    return {"data": {"train": ["a.bp"]}}


def test_defaults_and_int_to_float():
    cfg = config.from_dict({**base(), "model": {"cutoff": 5}})
    assert cfg.model.cutoff == 5.0 and isinstance(cfg.model.cutoff, float)
    assert cfg.run.dtype == "float32"


@pytest.mark.parametrize("table, message", [
    ({"model": {"cutof": 5.0}}, "model.cutof: unknown key"),
    ({"modle": {}}, "modle: unknown key"),
    ({"model": {"cutoff": -1.0}}, "model.cutoff = -1.0: must be > 0 Å"),
    ({"model": {"three_body_cutoff": 7.0}}, "model.three_body_cutoff = 7.0: must be <= model.cutoff"),
    ({"model": {"elements": ["Cu", "Xq"]}}, "unknown element(s) ['Xq']"),
    ({"model": {"line_width": -8}}, "model.line_width = -8: must be >= 0"),
    ({"run": {"dtype": "float16"}}, "run.dtype = 'float16'"),
    ({"run": {"max_seconds": -5.0}}, "run.max_seconds = -5.0: must be >= 0"),
    ({"run": {"steps": "10"}}, "run.steps = '10': must be of type int"),
    ({"comm": {"backend": "nccl"}}, "comm.backend = 'nccl'"),
    ({"run": {"init_from": "a.pt", "freeze": "backbone"}, "parallel": {"pp": 2}},
     'run.freeze = "backbone" with parallel.pp = 2: not supported'),
])
def test_bad_values_name_the_key(table, message):
    with pytest.raises(config.ConfigError) as info:
        config.from_dict({**base(), **table})
    assert message in str(info.value)


def test_no_datasets_is_an_error():
    with pytest.raises(config.ConfigError, match="data.train"):
        config.from_dict({})


def test_load_resolves_paths_and_names_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain = ["d.bp"]\n[run]\nout_dir = "out"\n')
    cfg = config.load(path)
    assert cfg.data.train == (str(tmp_path / "d.bp"),)
    assert cfg.run.out_dir == str(tmp_path / "out")
    path.write_text("[data\n")
    with pytest.raises(config.ConfigError, match=str(path)):
        config.load(path)
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.toml")


def test_model_preset_and_override():
    cfg = config.from_dict({**base(), "model": {"preset": "base", "cutoff": 5.5}})
    assert (cfg.model.width, cfg.model.blocks, cfg.model.cutoff) == (128, 10, 5.5)
    with pytest.raises(config.ConfigError, match="model.preset = 'huge': unknown"):
        config.from_dict({**base(), "model": {"preset": "huge"}})


@pytest.mark.parametrize("parallel, model, message", [
    ({"ep": 2}, {"preset": "small"}, "parallel.ep = 2: expert parallelism needs an MoE model"),
    ({"ep": 8}, {"preset": "small-moe"}, "parallel.ep = 8, model.moe_experts = 4: every EP rank must hold"),
    ({"ep": 3}, {"preset": "small-moe", "moe_experts": 8}, "moe_experts divisible by ep"),
    ({"ep": 1, "replace_experts_every": 5}, {"preset": "small-moe"}, r"replace_experts_every = 5: needs parallel.ep > 1 \(now 1\)"),
    ({"ep": 2, "pp": 2, "replace_experts_every": 5}, {"preset": "small-moe"}, "and pp = gp = 1"),
    ({"ep": 2, "replace_experts_every": -1}, {"preset": "small-moe"}, "replace_experts_every = -1: must be >= 0"),
    ({"ep": 2, "expert_replicas": 1}, {"preset": "small-moe"}, "expert_replicas = 1: needs parallel.replace_experts_every > 0"),
    ({"ep": 2, "replace_experts_every": 1, "expert_replicas": 3}, {"preset": "small-moe"},
     "expert_replicas = 3: .* at most model.moe_experts / parallel.ep = 2 spare slots"),
    ({"ep": 2, "replace_experts_every": 1, "expert_replicas": -1}, {"preset": "small-moe"}, "expert_replicas = -1: must be >= 0"),
    ({"resident_experts": 1}, {"preset": "small"}, r"resident_experts = 1: must be >= 0, and > 0 only for an MoE model"),
    ({"resident_experts": -1}, {"preset": "small-moe"}, "resident_experts = -1: must be >= 0"),
    ({"resident_experts": 1, "gp": 2}, {"preset": "small-moe"}, "resident_experts = 1: not yet with pipeline stages or graph"),
])
def test_expert_parallel_layout_must_fit_the_experts(parallel, model, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"data": {"train": ["x.bp"]}, "model": model, "parallel": parallel})


@pytest.mark.parametrize("parallel, model, message", [
    ({"gp": 2, "gp_halo": "mirror"}, {"preset": "small"}, "parallel.gp_halo = 'mirror': must be one of auto, exchange, ghost"),
    ({"gp": 2, "gp_halo": "exchange"}, {"preset": "small", "block": "matris"},
     'parallel.gp_halo = "exchange" with model.block = \'matris\': the per-block halo exchange needs the light block'),
])
def test_graph_parallel_halo_is_validated(parallel, model, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"data": {"train": ["x.bp"]}, "model": model, "parallel": parallel})


def test_overrides_and_stage_dir(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "emt.bp").mkdir()
    path = tmp_path / "c.toml"
    path.write_text('[data]\ntrain = ["data/emt.bp", "data/gfn2.bp"]\nglobal_batch_size = 8\n')
    cfg = config.load(path, ["data.global_batch_size=64", f'data.stage_dir="{tmp_path / "stage"}"', "run.dtype=float64"])
    assert cfg.data.global_batch_size == 64 and cfg.run.dtype == "float64"  # a bare word is a string
    sources = [d.path for d in cfg.data.sources(cfg.model.heads)]
    # staged copy read where it exists; a dataset that was not staged is read in place
    assert sources == [str(tmp_path / "stage" / "emt.bp"), str((tmp_path / "data" / "gfn2.bp").resolve())]
    assert [d.path for d in cfg.data.listed()] == [str((tmp_path / "data" / p).resolve()) for p in ("emt.bp", "gfn2.bp")]
    with pytest.raises(config.ConfigError, match="expected SECTION.KEY=VALUE"):
        config.load(path, ["global_batch_size"])
    with pytest.raises(config.ConfigError, match="'global_batch_size' is not a table"):
        config.load(path, ["data.global_batch_size.x=1"])


def test_the_schedule_decays_over_a_time_budget():
    from exaforce.config import OptimConfig
    from exaforce.training.schedule import Schedule

    schedule = Schedule(OptimConfig(lr=1.0, warmup_steps=2), total_steps=1000)
    assert schedule.lr_at(10) > 0.99  # by steps: barely started
    assert abs(schedule.lr_at(10, time_fraction=0.5) - 0.55) < 1e-12  # half the budget: half-way down the cosine
    assert abs(schedule.lr_at(10, time_fraction=1.0) - 0.1) < 1e-12
    assert schedule.lr_at(1, time_fraction=0.9) == 0.5  # warm-up is by steps
    to_zero = Schedule(OptimConfig(lr=1.0, warmup_steps=2, lr_final=0.0), total_steps=1000)
    assert to_zero.lr_at(1000) == 0.0 and abs(to_zero.lr_at(10, time_fraction=0.5) - 0.5) < 1e-12
    with pytest.raises(config.ConfigError, match=r"optim.lr_final = 1.5: must be in \[0, 1\]"):
        config.from_dict({"data": {"train": ["x.bp"]}, "optim": {"lr_final": 1.5}})


@pytest.mark.parametrize("parallel, message", [
    ({"pp": 5}, r"parallel.pp = 5: need 1 <= pp <= model.blocks \(4\)"),
    ({"pp": 2, "pp_chunks": 3}, r"parallel.pp_chunks = 3: .* pp · pp_chunks = 6 stages <= model.blocks \(4\)"),
    ({"pp_chunks": 2}, r"parallel.pp_chunks = 2: need >= 1, > 1 only with parallel.pp > 1"),
    ({"pp": 2, "pp_chunks": 0}, r"parallel.pp_chunks = 0: need >= 1"),
    ({"pp": 2, "pp_chunks": 2, "pp_schedule": "gpipe"}, "interleaved stages run the 'folded' schedule"),
    ({"pp": 2, "pp_chunks": 2, "pp_split": [2, 2]}, r"need 4 block counts \(pp · pp_chunks\) >= 1 summing to model.blocks = 4"),
])
def test_pipeline_layout_is_validated(parallel, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"data": {"train": ["x.bp"]}, "model": {"preset": "small", "blocks": 4}, "parallel": parallel})
    ok = config.from_dict({"data": {"train": ["x.bp"]}, "model": {"preset": "small", "blocks": 4},
                           "parallel": {"pp": 2, "pp_chunks": 2, "pp_split": [1, 1, 1, 1]}})
    assert ok.parallel.pp_chunks == 2


def test_a_model_saved_before_line_width_and_density_sum_is_rebuilt_as_it_was():
    """Model files and checkpoints written before these fields existed hold full-width line graphs
    and no density input: their absence means that, not today's defaults (config.WRITTEN_BEFORE)."""
    import dataclasses

    from exaforce.checkpoint import model_config_differences

    saved = dataclasses.asdict(config.ModelConfig())
    del saved["line_width"], saved["density_sum"]
    rebuilt = config.model_from_dict(saved)
    assert (rebuilt.line_channels, rebuilt.density_sum) == (64, False)
    assert config.model_from_dict({**saved, "line_width": 16, "density_sum": True}).line_channels == 16
    as_written = dataclasses.asdict(dataclasses.replace(config.ModelConfig(), line_width=0, density_sum=False))
    assert model_config_differences(saved, as_written) == {}
    assert set(model_config_differences(saved, dataclasses.asdict(config.ModelConfig()))) == {"line_width", "density_sum"}
