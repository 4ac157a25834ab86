"""Training configuration: frozen, self-validating dataclasses.

One `TrainConfig` describes a run of either stage: the model, the data and token-label settings (owned by
`trainer.data_config`), the optimiser, the schedule, the loss weights and the run itself. Each section
checks its values on construction and a bad one raises `TrainConfigError` naming the key. The CLIs load
these from a YAML preset plus `--set` overrides with `pipelines.config`. Pure Python (no torch), so a CLI
can validate a config before it imports anything heavy.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.data_config import DataConfig, TokenLabelConfig
from trainer.errors import TrainConfigError

# Paper recipe (docs/models.md "Paper recipe"): drop-path rate of the FAN blocks per model size.
DROP_PATH_BY_SIZE: Mapping[str, float] = {"tiny": 0.05, "small": 0.25, "base": 0.35, "large": 0.45}


# torch.compile's modes, as timm's train script passes them (`--torchcompile-mode`); reduce-overhead adds CUDA
# graphs, so a step's hundreds of kernels go out in a few launches.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    compile_mode: str = "default"  # torch.compile mode when `compile` (COMPILE_MODES)

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise TrainConfigError(f"model.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if not self.name:
            raise TrainConfigError("model.name must be a model name, e.g. fan_small_12_p4_hybrid_token")
        if self.num_classes < 2:
            raise TrainConfigError(f"model.num_classes must be >= 2, got {self.num_classes}")
        if self.img_size < 16:
            raise TrainConfigError(f"model.img_size must be >= 16, got {self.img_size}")
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise TrainConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

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
    # torch's fused (one kernel per step) implementation: None = on when every parameter is on a GPU and the
    # optimiser has one (AdamW, Adam, SGD), else timm's default (foreach); true insists, false never.
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TrainConfigError(f"optim.lr must be a positive number, got {self.lr}")
        if self.lr_base_batch < 1:
            raise TrainConfigError(f"optim.lr_base_batch must be >= 1, got {self.lr_base_batch}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise TrainConfigError(f"optim.clip_grad must be positive or null, got {self.clip_grad}")
        if self.clip_mode not in ("norm", "value", "agc"):
            raise TrainConfigError(f"optim.clip_mode must be norm, value or agc, got {self.clip_mode!r}")
        if self.accumulation_steps < 1:
            raise TrainConfigError(f"optim.accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.fused not in (None, True, False):
            raise TrainConfigError(f"optim.fused must be true, false or null (auto), got {self.fused!r}")

    def scaled_lr(self, global_batch: int) -> float:
        """Linear scaling rule (the paper's lr is quoted at global batch 1024)."""
        return self.lr * global_batch / self.lr_base_batch


@dataclass(frozen=True)
class ScheduleConfig:
    """timm's cosine schedule with timm's meaning of each field (docs/design.md "Library behaviour").

    epochs: the total epochs of the cosine, warmup included (timm's `--epochs`); cooldown_epochs: extra
    epochs at min_lr after it, which timm adds to the run (timm's `--cooldown-epochs`, default 0). So a
    run is `epochs + cooldown_epochs` epochs: epochs=1 with 5 warmup epochs is one epoch (still warming up).
    """

    epochs: int = 300
    warmup_epochs: int = 5
    cooldown_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    max_steps_per_epoch: int | None = None  # cap for smoke runs and benchmarks; None = the whole epoch

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise TrainConfigError(f"schedule.epochs must be >= 1, got {self.epochs}")
        if self.warmup_epochs < 0 or self.cooldown_epochs < 0:
            raise TrainConfigError("schedule.warmup_epochs and schedule.cooldown_epochs must be >= 0")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise TrainConfigError("schedule.warmup_lr and schedule.min_lr must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise TrainConfigError(f"schedule.max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")

    @property
    def total_epochs(self) -> int:
        """What timm's train script runs: the cosine's epochs (warmup inside them) + cool-down."""
        return self.epochs + self.cooldown_epochs


@dataclass(frozen=True)
class LossConfig:
    """Stage-1 weight α of the token-mean term (paper Eq. 2; 1 in the paper). Stage 2's β is `tokens.beta`."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise TrainConfigError(f"loss.alpha must be >= 0, got {self.alpha}")


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
    checkpoint_every: int | None = None  # also write last.pth every N updates (mid-epoch; survives SIGKILL)

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise TrainConfigError(f"run.checkpoint_every must be >= 1 or null, got {self.checkpoint_every}")
        if self.amp not in ("bf16", "fp16", "none"):
            raise TrainConfigError(f"run.amp must be bf16, fp16 or none, got {self.amp!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise TrainConfigError(f"run.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.log_every < 1:
            raise TrainConfigError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.metrics_format not in ("jsonl", "csv"):
            raise TrainConfigError(f"run.metrics_format must be jsonl or csv, got {self.metrics_format!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise TrainConfigError(f"run.device must be auto, cpu or cuda[:N], got {self.device!r}")


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

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe dict (tuples become lists): what checkpoints and the run folder's config.yaml hold."""
        return _plain(self)

    def save_yaml(self, path: str | Path) -> None:
        """Write the resolved config as YAML (what a run actually used), atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
