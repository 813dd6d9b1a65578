"""Training configuration: presets, TOML/JSON round trips, overrides, and errors before any work starts."""
from __future__ import annotations

import pytest

from cm3leon.training import PRESETS, TrainingConfig, load_config
from cm3leon.training.trainer import lr_at


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_toml_and_json(name, tmp_path):
    config = load_config(name)
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config
    assert TrainingConfig.from_json(config.to_json()) == config
    (tmp_path / "run.json").write_text(config.to_json())
    assert load_config(tmp_path / "run.json") == config


@pytest.mark.parametrize("text", ["runs/\U0001f98e", "caf\u00e9", 'quote " and \\ backslash',
                                  "tab\tnl\ndel\x7f", ""])
def test_any_string_round_trips_through_toml(text):
    # json.dumps wrote characters beyond U+FFFF as surrogate-pair escapes, which TOML refuses to read back
    config = TrainingConfig().replace(out_dir=text)
    assert config.to_toml().isascii()
    assert TrainingConfig.from_toml(config.to_toml()) == config


def test_null_model_overrides_raise():
    # TOML has no null: such a config could be built from JSON but not written as config.toml
    with pytest.raises(ValueError, match=r"model.overrides: \['n_kv_heads'\]"):
        TrainingConfig.from_json('{"model": {"preset": "chameleon-7b", "overrides": {"n_kv_heads": null}}}')


def test_sft_preset_scales_the_papers_sft_ratios_to_the_demo():
    pre, sft = load_config("demo-pretrain"), load_config("demo-sft")
    assert sft.stage == "sft" and sft.checkpoint.init_from.startswith(pre.out_dir)
    assert sft.optim.lr == pytest.approx(pre.optim.lr * 5e-5 / 6e-4)
    assert sft.schedule.warmup == pre.schedule.warmup // 10


def test_overrides_convert_to_the_field_types():
    config = load_config("tiny-pretrain", ["optim.lr=3e-4", "schedule.steps=20", "optim.betas=[0.9, 0.95]",
                                            "logging.plot=false", "out_dir=runs/x", 'stage="sft"',
                                            "model.overrides.n_layers=3", "data.sft_tasks=['vqa', 'edit']"])
    assert config.optim.lr == 3e-4 and isinstance(config.schedule.steps, int) and config.schedule.steps == 20
    assert config.optim.betas == (0.9, 0.95) and config.logging.plot is False
    assert config.out_dir == "runs/x" and config.stage == "sft"
    assert config.model.architecture(vocab_size=100).n_layers == 3
    assert config.data.sft_tasks == ("vqa", "edit")
    assert load_config("tiny-pretrain", ["optim.weight_decay=0"]).optim.weight_decay == 0.0  # int -> float


@pytest.mark.parametrize("override,error,match", [
    ("optim.lrr=1", ValueError, "unknown config key 'optim.lrr'"),
    ("nosection.x=1", ValueError, "unknown config key"),
    ("optim.lr", ValueError, "section.field=value"),
    ("optim.lr=-1", ValueError, "optim.lr must be > 0"),
    ("optim.lr=fast", ValueError, "cannot parse"),
    ("schedule.steps=2.5", TypeError, "schedule.steps must be an int"),
    ("schedule.steps=0", ValueError, "schedule.steps must be >= 1"),
    ("schedule.warmup=100", ValueError, "schedule.warmup"),
    ("schedule.decay='step'", ValueError, "schedule.decay must be one of"),
    ("parallel.mode='tp'", ValueError, "parallel.mode"),
    ("optim.betas=[0.9, 1.0]", ValueError, "optim.betas"),
    ("optim.betas=[0.9]", ValueError, "optim.betas must have 2 elements"),
    ("logging.plot=1", TypeError, "logging.plot must be a bool"),
    ("model.preset='huge'", ValueError, "model.preset"),
    ("model.overrides.depth=3", ValueError, "unknown CM3LeonConfig fields"),
    ("model.overrides.n_heads=5", ValueError, "model.overrides"),
    ("data.max_seq_len=4096", ValueError, "data.tokens_per_batch"),
    ("data.sft_tasks=['dance']", ValueError, "data.sft_tasks"),
    ("data.source='folder'", ValueError, "data.path is required"),
    ("data.sft_ratio_min=0", ValueError, "data.sft_ratio_min must be > 0"),
    # data the run would have silently ignored
    (("stage='sft'", "data.source='folder'", "data.path='x'"), ValueError, "data.source must be 'shapes'"),
    (("stage='sft'", "data.memory_bank='b'", "data.retrieval_encoder='e'"), ValueError,
     "data.memory_bank empty"),
    (("data.source='folder'", "data.path='x'", "data.memory_bank='b'", "data.retrieval_encoder='e'"),
     ValueError, "cannot be combined with data.memory_bank"),
])
def test_bad_overrides_raise_naming_the_key(override, error, match):
    with pytest.raises(error, match=match):
        load_config("tiny-pretrain", [override] if isinstance(override, str) else list(override))


def test_unknown_keys_in_files_raise(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('seed = 1\n[optim]\nlr = 1e-3\nmomentum = 0.9\n')
    with pytest.raises(ValueError, match=r"unknown config keys \['momentum'\] in \[optim\]"):
        load_config(path)
    path.write_text('[optimizer]\nlr = 1e-3\n')
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(path)
    path.write_text('[optim\nlr = 1')
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ValueError, match="preset"):
        load_config(tmp_path / "missing.toml")


def test_partial_file_takes_defaults_for_the_rest(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text('out_dir = "runs/a"\n[schedule]\nsteps = 50\nwarmup = 5\n')
    config = load_config(path)
    assert config.schedule.steps == 50 and config.optim == TrainingConfig().optim


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays_to_the_floor(decay):
    config = load_config("tiny-pretrain", ["schedule.steps=20", "schedule.warmup=4",
                                           f"schedule.decay='{decay}'",
                                           "optim.lr=1.0", "schedule.min_lr_ratio=0.1"])
    lrs = [lr_at(s, config) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(1.0 if decay == "constant" else 0.1)
    if decay == "linear":
        assert lrs[12] == pytest.approx(0.1 + 0.9 * (1 - 8 / 15))


def test_command_line_prints_the_resolved_config_and_rejects_bad_values(capsys, tmp_path):
    from cm3leon.training.__main__ import main

    assert main(["--config", "tiny-pretrain", "--set", "optim.lr=2e-3", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert TrainingConfig.from_toml(text) == load_config("tiny-pretrain", ["optim.lr=2e-3"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "tiny-pretrain", "--set", "optim.lr=-1"])
    assert exit_info.value.code == 2 and "optim.lr must be > 0" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n'
                                            '{"step": 2, "loss": 2.5, "val_loss": 2.7}\n')
    assert main(["--plot", str(tmp_path)]) == 0 and (tmp_path / "loss.png").is_file()
    with pytest.raises(SystemExit) as exit_info:  # used to end in a FileNotFoundError traceback
        main(["--plot", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("parallel.mode='ddp'", "needs a process group: launch with torchrun"),
    ("checkpoint.init_from='{missing}'", "does not exist"),
])
def test_command_line_refuses_a_config_this_launch_cannot_run(override, message, capsys, tmp_path, monkeypatch):
    # Both used to end in a traceback with exit status 1; init_from only after the data was prepared.
    from cm3leon.training.__main__ import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    overrides = [override.format(missing=tmp_path / "missing"), f"out_dir='{tmp_path / 'run'}'"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "tiny-pretrain", *sum((["--set", o] for o in overrides), [])])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was prepared or written
