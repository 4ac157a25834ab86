"""The one config mechanism (pipelines.config) on the training config and on generate's settings: YAML
presets load, unknown keys and bad values name the key and the file or `--set`, overrides apply in order."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, build, load_config, merge, parse_set, read_preset
from pipelines.generate import GenerateSettings
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.errors import TrainConfigError, TrainerError


def load_train_config(path=None, sets=(), extra=None) -> TrainConfig:
    return load_config(TrainConfig, path, sets, extra)

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


@pytest.mark.parametrize("size, lr, global_batch, warmup", [("tiny", 2e-3, 1024, 5), ("small", 2e-3, 1024, 5),
                                                          ("base", 4e-3, 2048, 10), ("large", 4e-3, 2048, 10)])
def test_paper_presets_match_the_paper(size, lr, global_batch, warmup):
    """lr at the paper's batch, unmixed token labels (the reference), eval crop 1.0 (FAN), 350 + 10 epochs as timm."""
    cfg = load_train_config(PRESET_DIR / f"paper_{size}.yaml", ["data.shards=x.tar"])
    assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.data.batch_size * 8) == (lr, global_batch, global_batch)
    assert cfg.tokens.token_mix == "none" and cfg.data.crop_pct == 1.0
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.total_epochs) == (350, warmup, 360)
    assert cfg.data.rand_augment == "rand-m9-mstd0.5-inc1"


@pytest.mark.parametrize("name, rate", [("fan_tiny_8_p4_hybrid_token", 0.05), ("fan_small_12_p4_hybrid_token", 0.25),
                                        ("fan_base_16_p4_hybrid", 0.35), ("fan_large_16_p4_hybrid_token", 0.45),
                                        ("fan_test_p4_hybrid_token", 0.0)])
def test_drop_path_per_size_from_the_name_unless_set(name, rate):
    assert ModelConfig(name=name).resolved_drop_path_rate == rate
    assert ModelConfig(name=name, drop_path_rate=0.1).resolved_drop_path_rate == 0.1


def test_model_compile_mode_is_one_of_torch_compiles_modes():
    assert ModelConfig(compile=True, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(TrainConfigError, match="model.compile_mode must be one of"):
        ModelConfig(compile_mode="fast")


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
    with pytest.raises(ConfigError, match=r"--set optim\.lrr=1: unknown key optim\.lrr"):
        load_train_config(p, ["optim.lr=1", "optim.lrr=1"])  # the item itself is named
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_set("optim.lr")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_set("view..x=1")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_set("data.shards=[a-{0..3}.tar]")
    assert load_train_config(None, ["data.shards=a-{0..3}.tar"]).data.shards == ("a-{0..3}.tar",)


def test_extra_settings_from_the_command_line_merge_under_set(tmp_path):
    p = write(tmp_path, "data:\n  batch_size: 4\n")
    cfg = load_train_config(p, ["data.batch_size=16"], extra={"data": {"shards": ["s.tar"], "batch_size": 8}})
    assert cfg.data.batch_size == 16 and cfg.data.shards == ("s.tar",)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_train_config(None, ["optim.betas=[0.8, 0.9]", "data.shards=[a.tar]", "optim.clip_grad=3"])
    cfg.save_yaml(tmp_path / "config.yaml")
    back = build(TrainConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()), "config.yaml")
    assert back == cfg and back.to_dict()["optim"]["betas"] == [0.8, 0.9]


def test_lr_scales_linearly_with_global_batch():
    assert OptimConfig(lr=2e-3).scaled_lr(256) == pytest.approx(5e-4)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_states_command_runtime_and_result(preset):
    cfg = load_train_config(preset)
    header = preset.read_text().split("\n\n")[0]
    for word in ("command:", "runtime:", "expected:"):
        assert word in header.lower(), f"{preset.name}: header comment lacks '{word}'"
    assert cfg.model.name



def test_section_validation_is_a_trainer_error_naming_the_key():
    with pytest.raises(TrainConfigError, match="optim.lr must be a positive"):
        OptimConfig(lr=-1)
    assert issubclass(TrainConfigError, TrainerError) and issubclass(TrainConfigError, ValueError)
    assert not issubclass(TrainConfigError, ConfigError)  # one ConfigError in the project: pipelines'


# --- the same mechanism on generate's settings (flat keys, a `view` mapping with fixed keys) ------------------

GEN = dict(shards=["s.tar"], store="l.zarr", name="t", model="fan_test_p4_hybrid_token")


def test_generate_preset_then_options_then_sets_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("views: 8\ntopk: 3\nview:\n  hflip: 0.0\ninput_size: [64, 64]\n")
    s = load_config(GenerateSettings, preset, ["views=4", "view.scale=[0.35, 1]", "compile=true", "checkpoint=null"],
                    {**GEN, "views": 6, "amp": "none"})
    assert s.views == 4 and s.topk == 3 and s.amp == "none" and s.compile is True and s.checkpoint is None
    assert s.view["hflip"] == 0.0 and s.view["scale"] == [0.35, 1] and "ratio" in s.view  # other view keys kept
    assert s.input_size == (64, 64) and s.shards == ("s.tar",) and s.num_classes is None
    assert GenerateSettings(**GEN).view["hflip"] == 0.5  # defaults untouched


def test_generate_unknown_keys_name_key_and_source(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("view:\n  hflp: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key view.hflp \(known keys under view: .*hflip"):
        load_config(GenerateSettings, preset, [], GEN)
    with pytest.raises(ConfigError, match=r"--set vews=3: unknown key vews"):
        load_config(GenerateSettings, None, ["vews=3"], GEN)


@pytest.mark.parametrize("item, match", [("views=abc", "views must be an integer"), ("compile=1", "compile: 1 fits none of"),
                                         ("input_size=3", "input_size must be a list"), ("views", "KEY.PATH=VALUE"),
                                         ("amp=[1", "not valid YAML"), ("amp=fp8", "amp must be one of"),
                                         ("view=3", "view must be a mapping")])
def test_generate_bad_overrides(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(GenerateSettings, None, [item], GEN)


def test_preset_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        read_preset(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_preset(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_preset(tmp_path / "empty.yaml") == {}


def test_parse_set_and_merge():
    assert parse_set("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_set("name=fan_tl_s") == {"name": "fan_tl_s"}
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@dataclass(frozen=True)
class Inner:
    x: int = 1


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "a"

    def __post_init__(self):
        if not self.name:
            raise ValueError("name must not be empty")


def test_build_nested_and_validated():
    assert build(Outer, {"inner": {"x": 3}, "name": "b"}) == Outer(Inner(3), "b")
    with pytest.raises(ConfigError, match="unknown key nme"):
        build(Outer, {"nme": "b"})
    with pytest.raises(ConfigError, match="unknown key inner.y"):
        build(Outer, {"inner": {"y": 1}})
    with pytest.raises(ConfigError, match="src: name must not be empty"):  # the dataclass's own check, with the source
        build(Outer, {"name": ""}, "src")


GENERATE_PRESETS = sorted(PRESET_DIR.glob("generate_*.yaml"))


def test_a_generate_preset_per_paper_size():
    assert [p.stem for p in GENERATE_PRESETS] == ["generate_base", "generate_large", "generate_small", "generate_tiny"]


@pytest.mark.parametrize("preset", GENERATE_PRESETS, ids=[p.name for p in GENERATE_PRESETS])
def test_every_generate_preset_loads_and_states_command_and_result(preset):
    size = preset.stem.removeprefix("generate_")
    s = load_config(GenerateSettings, preset, ["shards=[s.tar]"], {"store": "l.zarr"})
    assert f"fan_{size}_" in s.model and s.name == f"fan_tl_{size[0]}"
    assert (s.input_size, s.views, s.topk, s.num_classes) == ((224, 224), 32, 10, None)
    header = preset.read_text().split("\n\n")[0].lower()
    for word in ("command:", "does:", "expected:", f"--config pipelines/presets/{preset.name}"):
        assert word in header, f"{preset.name}: header comment lacks '{word}'"
