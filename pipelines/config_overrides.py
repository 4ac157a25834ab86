"""Configs for both CLIs: defaults ← YAML preset ← `--set a.b=c`; unknown keys are errors.

A config is a plain nested dict whose keys and value types are fixed by its defaults (usually
`dataclasses.asdict` of a frozen settings dataclass). A preset or an override may only set keys that
exist there, with a value of a compatible type, so a typo fails at start-up naming the key and the
source (file or `--set`), instead of being ignored or failing hours later.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence


class ConfigError(ValueError):
    """A preset or override that does not fit the config (unknown key, wrong type, bad syntax)."""


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`; ConfigError naming the file when it is missing or not a mapping."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _coerce(default: Any, value: Any, where: str) -> Any:
    """`value` converted to the type of `default`, or ConfigError."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{where}: expected {type(default).__name__} (like {default!r}), got {value!r}")


def merge(base: Mapping, update: Mapping, source: str, prefix: str = "") -> dict:
    """`base` with the keys of `update` replaced, recursively; every key must already exist in `base`."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            known = ", ".join(sorted(map(str, out))) or "(none)"
            raise ConfigError(f"{source}: unknown key {dotted!r}; known keys here: {known}")
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, source, prefix=f"{dotted}.")
        else:
            out[key] = _coerce(out[key], value, f"{source}: {dotted}")
    return out


def parse_override(text: str) -> dict:
    """`a.b=c` → {"a": {"b": c}}, with `c` parsed as YAML (`3`, `0.5`, `true`, `[224, 224]`, `bf16`)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set views=32")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {e}") from e
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(defaults: Mapping, preset: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """defaults ← preset file ← each `--set` in order."""
    config = copy.deepcopy(dict(defaults))
    if preset is not None:
        config = merge(config, load_yaml(preset), source=f"config {preset}")
    for text in overrides:
        config = merge(config, parse_override(text), source=f"--set {text}")
    return config


def dataclass_from_dict(cls: type, data: Mapping) -> Any:
    """Build a (nested) dataclass from a config dict; the dataclass's own validation runs as usual."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value, hint = data[field.name], hints.get(field.name)
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = dataclass_from_dict(hint, value)
        kwargs[field.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return cls(**kwargs)
