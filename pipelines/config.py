"""The one config mechanism of both CLIs: defaults ← YAML preset ← command-line options ← `--set a.b=c`.

A config is a frozen dataclass (nested sections are dataclasses too): `stl-train` builds a
`trainer.config.TrainConfig`, `stl-labels generate` a `pipelines.generate.GenerateSettings`. Every value
from a preset or an override is coerced to the field's annotated type (int → float, list → tuple, nested
mappings → sections), and every key must exist, so a typo (`optim.weight_decy`) fails at start-up with a
`ConfigError` naming the key and where it came from (the file or the `--set` item) instead of being
ignored. The dataclasses validate their own values on construction. Pure Python + PyYAML: a CLI validates
its config before it imports torch.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A preset or override does not fit the config (unknown key, wrong type, bad syntax, invalid value)."""


def read_preset(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`; ConfigError naming the file when it is missing, unparsable or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(loaded).__name__}")
    return dict(loaded)


def parse_set(item: str) -> dict[str, Any]:
    """`"optim.lr=1e-3"` -> {"optim": {"lr": 0.001}}; the value is parsed as YAML (lists, null, numbers)."""
    path, sep, raw = item.partition("=")
    parts = path.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. optim.lr=1e-3")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote it?): {e}") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: override wins; nested sections merge key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _fixed_keys(f: dataclasses.Field) -> dict[str, Any] | None:
    """Default of a plain-dict field whose keys are fixed by it (e.g. generate's `view`), else None."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return default if isinstance(default, Mapping) and default else None


def _unknown_key(source: str, prefix: str, key: str, names) -> ConfigError:
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(f"{source}: unknown key {prefix}{key} (known keys under {section}: {', '.join(sorted(names))})")


def check_keys(cls: type, values: Any, source: str, prefix: str = "") -> None:
    """Only the key check of `build` (values may still be incomplete: command-line options come later)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping of settings")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k, v in values.items():
        if k not in fields:
            raise _unknown_key(source, prefix, k, fields)
        fixed = _fixed_keys(fields[k])
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, Mapping):
            check_keys(hints[k], v, source, prefix=f"{prefix}{k}.")
        elif fixed is not None and isinstance(v, Mapping):
            for sub in v:
                if sub not in fixed:
                    raise _unknown_key(source, f"{prefix}{k}.", sub, fixed)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Turn a YAML value into the annotated type (int→float, list→tuple, nested dicts→dataclasses)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{source}: {key} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping of settings, got {value!r}")
        return build(hint, value, source, prefix=f"{key}.")
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if isinstance(value, str) and typing.get_args(hint) in ((str, Ellipsis), (str,)):
            value = [value]  # one shard pattern given as a plain string
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return list(items) if origin is list or hint is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping of settings, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads "1e-3" (no dot) as a string: accept any text that parses as a number.
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    return value


def build(cls: type, values: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Build a (nested) frozen dataclass from a mapping; unknown keys and bad values name the key and source.

    A plain-dict field whose default is a non-empty dict (generate's `view`) takes only the default's keys
    and keeps the defaults of those not given.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping of settings")
    check_keys(cls, values, source, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}", source)
        fixed = _fixed_keys(fields[k])
        if fixed is not None and isinstance(kwargs[k], dict):
            kwargs[k] = {**fixed, **kwargs[k]}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None  # the dataclasses' own messages name their key


def load_config(cls: type, preset: str | Path | None = None, sets: Sequence[str] = (),
                options: Mapping[str, Any] | None = None) -> Any:
    """defaults of `cls` ← preset YAML (optional) ← `options` (command-line flags) ← each `--set` in order.

    Unknown keys are named with the file they came from, or the `--set` item; a value error names the
    key and every source that was merged.
    """
    settings: dict[str, Any] = {}
    sources = []
    if preset is not None:
        settings = read_preset(preset)
        check_keys(cls, settings, str(preset))
        sources.append(str(preset))
    if options:
        check_keys(cls, options, "command line")
        settings = merge(settings, options)
        sources.append("command line")
    for item in sets:
        parsed = parse_set(item)
        check_keys(cls, parsed, f"--set {item}")
        settings = merge(settings, parsed)
    if sets:
        sources.append("--set")
    return build(cls, settings, " + ".join(sources) or "<defaults>")
