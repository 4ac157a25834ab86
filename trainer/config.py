"""Training configuration: frozen, self-validating dataclasses, loaded from YAML with `--set` overrides.

One `TrainConfig` describes a run of either stage: the model, the data and token-label settings (owned by
`trainer.data_config`), the optimiser, the schedule, the loss weights and the run itself. Loading is
generic over nested frozen dataclasses so that a typo anywhere (`optim.weight_decy`) is an error that
names the key and the file instead of a silently ignored setting. Pure Python + PyYAML (no torch), so a
CLI can validate a config before it imports anything heavy.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.data_config import DataConfig, TokenLabelConfig


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and where it came from."""


# Paper recipe (docs/models.md "Paper recipe"): drop-path rate of the FAN blocks per model size.
DROP_PATH_BY_SIZE: Mapping[str, float] = {"tiny": 0.05, "small": 0.25, "base": 0.35, "large": 0.45}


def model_size(model_name: str) -> str | None:
    """'fan_small_12_p4_hybrid_token' -> 'small'; None when the name carries no known size."""
    parts = model_name.split("_")
    return next((p for p in parts if p in DROP_PATH_BY_SIZE), None)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to train. `drop_path_rate=None` takes the paper's rate for the size in the name."""

    name: str = "fan_tiny_8_p4_hybrid_token"
    num_classes: int = 1000
    img_size: int = 224
    drop_path_rate: float | None = None
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name must be a model name, e.g. fan_small_12_p4_hybrid_token")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be >= 2, got {self.num_classes}")
        if self.img_size < 16:
            raise ConfigError(f"model.img_size must be >= 16, got {self.img_size}")
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def resolved_drop_path_rate(self) -> float:
        """The configured rate, else the paper's per-size rate, else 0 (test-size models)."""
        if self.drop_path_rate is not None:
            return self.drop_path_rate
        size = model_size(self.name)
        return DROP_PATH_BY_SIZE[size] if size else 0.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW as in the paper. `lr` is for a global batch of `lr_base_batch`; it scales linearly with it."""

    name: str = "adamw"
    lr: float = 2e-3
    lr_base_batch: int = 1024
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"optim.lr must be a positive number, got {self.lr}")
        if self.lr_base_batch < 1:
            raise ConfigError(f"optim.lr_base_batch must be >= 1, got {self.lr_base_batch}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad must be positive or null, got {self.clip_grad}")
        if self.clip_mode not in ("norm", "value", "agc"):
            raise ConfigError(f"optim.clip_mode must be norm, value or agc, got {self.clip_mode!r}")
        if self.accumulation_steps < 1:
            raise ConfigError(f"optim.accumulation_steps must be >= 1, got {self.accumulation_steps}")

    def scaled_lr(self, global_batch: int) -> float:
        """Linear scaling rule (the paper's lr is quoted at global batch 1024)."""
        return self.lr * global_batch / self.lr_base_batch


@dataclass(frozen=True)
class ScheduleConfig:
    """Cosine with a warmup *prefix* (warmup epochs come before the cosine) and a cool-down at min_lr."""

    epochs: int = 350
    warmup_epochs: int = 5
    cooldown_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    max_steps_per_epoch: int | None = None  # cap for smoke runs and benchmarks; None = the whole epoch

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"schedule.epochs must be >= 1, got {self.epochs}")
        if self.warmup_epochs < 0 or self.cooldown_epochs < 0:
            raise ConfigError("schedule.warmup_epochs and schedule.cooldown_epochs must be >= 0")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise ConfigError("schedule.warmup_lr and schedule.min_lr must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"schedule.max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")

    @property
    def total_epochs(self) -> int:
        """What timm's scheduler runs: warmup prefix + cosine epochs + cool-down."""
        return self.warmup_epochs + self.epochs + self.cooldown_epochs


@dataclass(frozen=True)
class LossConfig:
    """Stage-1 weight α of the token-mean term (paper Eq. 2; 1 in the paper). Stage 2's β is `tokens.beta`."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ConfigError(f"loss.alpha must be >= 0, got {self.alpha}")


@dataclass(frozen=True)
class RunConfig:
    """How the run executes: precision, EMA, device, logging. Batch size and seed are in `data`."""

    device: str = "auto"  # auto = cuda when available, else cpu
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    ema_decay: float | None = 0.99992
    ema_warmup: bool = False
    log_every: int = 50
    metrics_format: Literal["jsonl", "csv"] = "jsonl"
    tensorboard: bool = True  # used only when tensorboard is installed
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.amp not in ("bf16", "fp16", "none"):
            raise ConfigError(f"run.amp must be bf16, fp16 or none, got {self.amp!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"run.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.log_every < 1:
            raise ConfigError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.metrics_format not in ("jsonl", "csv"):
            raise ConfigError(f"run.metrics_format must be jsonl or csv, got {self.metrics_format!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"run.device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs (either stage); saved resolved in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokens: TokenLabelConfig = field(default_factory=TokenLabelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---- generic loading: dict/YAML -> nested frozen dataclasses -------------------------------------------


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
        return build_dataclass(hint, value, source, prefix=f"{key}.")
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
        return list(items) if origin is list else tuple(items)
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
    if isinstance(hint, type) and hasattr(hint, "from_dict") and isinstance(value, Mapping):
        return hint.from_dict(dict(value))  # e.g. labelstore.ViewSpec: it validates itself
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Build a (nested) frozen dataclass from a mapping; unknown keys and bad values name key and source."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]!s} (known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", source) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None  # the sections' messages name their key


def check_keys(cls: type, values: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Only the key check of `build_dataclass` (values may still be incomplete, e.g. shards come later)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping of settings")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"{source}: unknown key {prefix}{k} (known keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, Mapping):
            check_keys(hints[k], v, source, prefix=f"{prefix}{k}.")


def config_to_dict(cfg: Any) -> Any:
    """Plain JSON/YAML-safe dict of a config (tuples become lists, nested objects with to_dict use it)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        if hasattr(cfg, "to_dict") and not isinstance(cfg, TrainConfig):
            return config_to_dict(cfg.to_dict())
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def parse_set_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "run.amp=none"]` -> nested dict; the value is parsed as YAML (lists, null, numbers)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip() or any(not p for p in path.strip().split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. optim.lr=1e-3")
        parts = path.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is set both as a value and as a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote it?): {e}") from None
    return nested


def merge_settings(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: override wins; nested sections merge key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_settings(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                      extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Preset YAML (optional) → merge `extra` (CLI options) → apply `--set` overrides → validated TrainConfig.

    Errors name the file for keys from the YAML and `--set` for keys from the command line.
    """
    settings: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
        check_keys(TrainConfig, loaded, str(path))  # unknown keys in the file are named with the file
        settings, source = dict(loaded), str(path)
    if extra:
        settings = merge_settings(settings, extra)
    if overrides:
        parsed = parse_set_overrides(overrides)
        check_keys(TrainConfig, parsed, "--set")
        settings = merge_settings(settings, parsed)
        source = f"{source} + --set"
    return build_dataclass(TrainConfig, settings, source)


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def train_config_from_dict(values: Mapping[str, Any], source: str = "<checkpoint>") -> TrainConfig:
    """Rebuild a TrainConfig from `config_to_dict` output (checkpoints store it this way)."""
    return build_dataclass(TrainConfig, values, source)
