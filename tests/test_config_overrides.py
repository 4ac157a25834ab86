"""pipelines.config_overrides: defaults ← YAML preset ← --set, unknown keys and wrong types are errors."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipelines.config_overrides import ConfigError, dataclass_from_dict, load_config, merge, parse_override

DEFAULTS = {"views": 32, "amp": "bf16", "lr": 0.001, "compile": False, "size": [224, 224], "ckpt": None,
            "view": {"scale": [0.08, 1.0], "hflip": 0.5}}


def test_preset_then_overrides_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("views: 8\nview:\n  hflip: 0.0\n")
    cfg = load_config(DEFAULTS, preset, ["views=4", "view.scale=[0.35, 1]", "lr=1", "compile=true", "ckpt=a.pth"])
    assert cfg["views"] == 4 and cfg["view"] == {"scale": [0.35, 1], "hflip": 0.0}
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float) and cfg["compile"] is True and cfg["ckpt"] == "a.pth"
    assert DEFAULTS["views"] == 32 and DEFAULTS["view"]["hflip"] == 0.5  # defaults untouched


def test_unknown_keys_name_key_and_source(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("view:\n  hflp: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'view.hflp'; known keys here: hflip, scale"):
        load_config(DEFAULTS, preset)
    with pytest.raises(ConfigError, match=r"--set vews=3: unknown key 'vews'"):
        load_config(DEFAULTS, None, ["vews=3"])


@pytest.mark.parametrize("text, match", [("views=abc", "expected int"), ("compile=1", "expected bool"),
                                         ("size=3", "expected list"), ("views", "KEY=VALUE"),
                                         ("view..x=1", "empty key"), ("amp=[1", "not valid YAML")])
def test_bad_overrides(text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEFAULTS, None, [text])


def test_preset_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(DEFAULTS, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(DEFAULTS, tmp_path / "list.yaml")


def test_parse_override_and_merge():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("name=fan_tl_s") == {"name": "fan_tl_s"}
    assert merge({"a": {"b": 1}}, {"a": {"b": 2}}, "t") == {"a": {"b": 2}}


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


def test_dataclass_from_dict_nested_and_validated():
    assert dataclass_from_dict(Outer, {"inner": {"x": 3}, "name": "b"}) == Outer(Inner(3), "b")
    with pytest.raises(ConfigError, match="unknown keys"):
        dataclass_from_dict(Outer, {"nme": "b"})
    with pytest.raises(ValueError, match="name must not be empty"):
        dataclass_from_dict(Outer, {"name": ""})
