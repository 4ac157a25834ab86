"""Training config: YAML presets load, unknown keys and bad values name the key and the file, --set works."""
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    ConfigError, ModelConfig, OptimConfig, TrainConfig, config_to_dict, load_train_config,
    parse_set_overrides, save_train_config, train_config_from_dict,
)

PRESET_DIR = Path(__file__).parents[1] / "pipelines" / "presets"
PRESETS = sorted([*PRESET_DIR.glob("paper_*.yaml"), PRESET_DIR / "cpu_smoke.yaml"])  # the training presets


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 2e-3, 0.05)
    assert cfg.run.ema_decay == 0.99992 and cfg.tokens.beta == 1.0 and cfg.loss.alpha == 1.0


@pytest.mark.parametrize("name, rate", [("fan_tiny_8_p4_hybrid_token", 0.05), ("fan_small_12_p4_hybrid_token", 0.25),
                                        ("fan_base_16_p4_hybrid", 0.35), ("fan_large_16_p4_hybrid_token", 0.45),
                                        ("fan_test_p4_hybrid_token", 0.0)])
def test_drop_path_per_size_from_the_name_unless_set(name, rate):
    assert ModelConfig(name=name).resolved_drop_path_rate == rate
    assert ModelConfig(name=name, drop_path_rate=0.1).resolved_drop_path_rate == 0.1


def test_yaml_loads_and_coerces_types(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\nschedule:\n  epochs: 3\n"
                        "data:\n  shards: [a.tar, b.tar]\n  batch_size: 8\n")
    cfg = load_train_config(p)
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.95)  # "1e-3" is a string to PyYAML
    assert cfg.data.shards == ("a.tar", "b.tar") and cfg.schedule.epochs == 3


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    p = write(tmp_path, "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim\.weight_decy"):
        load_train_config(p)
    p = write(tmp_path, "optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key optimiser"):
        load_train_config(p)
    p = write(tmp_path, "data:\n  shardz: [a.tar]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*data\.shardz"):
        load_train_config(p)


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: fast\n", "optim.lr must be a number"),
    ("optim:\n  lr: -1\n", "optim.lr must be a positive"),
    ("run:\n  amp: fp8\n", "run.amp"),
    ("schedule:\n  epochs: 2.5\n", "schedule.epochs must be an integer"),
    ("tokens:\n  mode: sample\n", "tokens.mode"),
    ("model: fan\n", "model must be a mapping"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_bad_values_are_errors_naming_the_setting(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(write(tmp_path, text))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")


def test_set_overrides_win_and_unknown_set_keys_are_errors(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.001\n  clip_grad: 1.0\n")
    cfg = load_train_config(p, ["optim.lr=5e-4", "optim.clip_grad=null", "model.name=fan_small_12_p4_hybrid_token",
                                "data.shards=[x.tar]"])
    assert cfg.optim.lr == 5e-4 and cfg.optim.clip_grad is None and cfg.data.shards == ("x.tar",)
    assert cfg.model.resolved_drop_path_rate == 0.25
    with pytest.raises(ConfigError, match=r"--set.*optim\.lrr"):
        load_train_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_set_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_set_overrides(["data.shards=[a-{0..3}.tar]"])
    assert load_train_config(None, ["data.shards=a-{0..3}.tar"]).data.shards == ("a-{0..3}.tar",)


def test_extra_settings_from_the_command_line_merge_under_set(tmp_path):
    p = write(tmp_path, "data:\n  batch_size: 4\n")
    cfg = load_train_config(p, ["data.batch_size=16"], extra={"data": {"shards": ["s.tar"], "batch_size": 8}})
    assert cfg.data.batch_size == 16 and cfg.data.shards == ("s.tar",)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_train_config(None, ["optim.betas=[0.8, 0.9]", "data.shards=[a.tar]", "optim.clip_grad=3"])
    save_train_config(cfg, tmp_path / "config.yaml")
    back = train_config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert back == cfg and config_to_dict(back)["optim"]["betas"] == [0.8, 0.9]


def test_lr_scales_linearly_with_global_batch():
    assert OptimConfig(lr=2e-3).scaled_lr(256) == pytest.approx(5e-4)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_states_command_runtime_and_result(preset):
    cfg = load_train_config(preset)
    header = preset.read_text().split("\n\n")[0]
    for word in ("command:", "runtime:", "expected:"):
        assert word in header.lower(), f"{preset.name}: header comment lacks '{word}'"
    assert cfg.model.name

