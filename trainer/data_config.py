"""Settings of the student data path and of the token-label targets (frozen, validated on creation)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.errors import TrainConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VIEW_CHOICES = ("chunk", "first")
TOKEN_MODES = ("gumbel", "softmax", "argmax")
TOKEN_MIXES = ("follow", "none")
ERASE_MODES = ("const", "rand", "pixel")
AUGMENT_DEVICES = ("auto", "cpu", "cuda")


def _pair(value, name: str) -> tuple[int, int]:
    """An int or a pair → (h, w); rejects anything else with the setting's name."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{name} must be an int or a pair (h, w), got {value!r}") from None
    if h <= 0 or w <= 0:
        raise TrainConfigError(f"{name} must be positive, got {value!r}")
    return h, w


def _unit(value: float, name: str) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise TrainConfigError(f"{name} must lie in [0, 1], got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How images reach the student (and the stage-1 labeler): shards, batching, augmentation, mixing.

    Defaults follow the STL/FAN ImageNet recipe (DeiT-style): RandAugment m9 mstd0.5 (photometric
    ops only for the student: the geometric ones are already in the stored view), random erasing
    0.25, mixup 0.8, cutmix 1.0, switch prob 0.5, class-label smoothing 0.1.
    """

    shards: tuple[str, ...] = ()
    batch_size: int = 64
    workers: int = 4
    input_size: tuple[int, int] | None = None  # None: the labeler's view size (student) / 224 (others)
    seed: int = 0
    view_choice: str = "chunk"  # docs/design.md: one view per row-chunk per epoch; "first": always view 0
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # "" disables RandAugment
    reprob: float = 0.25  # random-erasing probability (0.3 in some presets)
    remode: str = "pixel"
    mixup: float = 0.8  # Beta(α, α) for mixup; 0 disables
    cutmix: float = 1.0  # Beta(α, α) for cutmix; 0 disables
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # P(cutmix) when both are enabled
    label_smoothing: float = 0.1  # of the class target
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875  # eval: resize to size / crop_pct, centre crop
    shuffle_buffer: int = 256  # samples shuffled within a data worker (0: shard order)
    student_augs: bool = True  # False: no RandAugment / erasing (replay checks, debugging)
    drop_last: bool = False  # True drops each worker's last partial batch (those samples are not seen)
    # Where the student's view render + photometric ops run: cpu = Pillow in the data workers; cuda = workers
    # only decode, the GPU renders and augments (docs/design.md "The train-time data path"); auto = cuda
    # when the model is on a GPU.
    augment_device: str = "auto"
    # On a GPU, a batch's photometric ops as one captured CUDA graph (trainer/photometric_graph.py): one launch
    # instead of a few hundred from Python; false: the grouped ops, launched one by one. Same pixels either way.
    photometric_graph: bool = True
    prefetch_factor: int = 4  # batches each data worker keeps ready
    # Start the next epoch's workers (a second DataLoader with its own persistent workers) before this epoch
    # ends, so the step does not wait at the boundary (docs/design.md "The train-time data path").
    overlap_epochs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            object.__setattr__(self, "shards", (self.shards,))
        object.__setattr__(self, "shards", tuple(str(s) for s in self.shards))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", _pair(self.input_size, "data.input_size"))
        for name in ("batch_size",):
            if int(getattr(self, name)) < 1:
                raise TrainConfigError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.workers) < 0:
            raise TrainConfigError(f"data.workers must be >= 0, got {self.workers!r}")
        if int(self.shuffle_buffer) < 0:
            raise TrainConfigError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer!r}")
        if self.augment_device not in AUGMENT_DEVICES:
            raise TrainConfigError(f"data.augment_device must be one of {AUGMENT_DEVICES}, got {self.augment_device!r}")
        if int(self.prefetch_factor) < 1:
            raise TrainConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor!r}")
        if self.view_choice not in VIEW_CHOICES:
            raise TrainConfigError(f"data.view_choice must be one of {VIEW_CHOICES}, got {self.view_choice!r}")
        if self.rand_augment and not re.fullmatch(r"rand(-[a-z]+[0-9.]+)*", self.rand_augment):
            raise TrainConfigError(f"data.rand_augment must look like 'rand-m9-mstd0.5-inc1' (or be ''), "
                             f"got {self.rand_augment!r}")
        if self.remode not in ERASE_MODES:
            raise TrainConfigError(f"data.remode must be one of {ERASE_MODES}, got {self.remode!r}")
        for name in ("reprob", "mix_prob", "switch_prob", "label_smoothing"):
            _unit(getattr(self, name), f"data.{name}")
        for name in ("mixup", "cutmix"):
            if float(getattr(self, name)) < 0:
                raise TrainConfigError(f"data.{name} (Beta alpha) must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise TrainConfigError(f"data.crop_pct must lie in (0, 1], got {self.crop_pct!r}")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3 or (name == "std" and min(v) <= 0):
                raise TrainConfigError(f"data.{name} must be 3 numbers (std > 0), got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)

    def augment_on_device(self, device) -> bool:
        """True when the student's render + photometric ops run on `device` (the model's) rather than in the workers."""
        kind = getattr(device, "type", str(device))
        if self.augment_device == "cuda" and kind != "cuda":
            raise TrainConfigError(f"data.augment_device is 'cuda' but the run's device is {kind!r}: use 'auto' or 'cpu'")
        return self.augment_device == "cuda" or (self.augment_device == "auto" and kind == "cuda")

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass(frozen=True)
class TokenLabelConfig:
    """How stored token logits become per-token training targets (docs/design.md "Token labels at train time").

    mode: gumbel (default; one categorical draw per token per step over top-k ∪ {tail}), softmax
    (soft targets at temperature tau) or argmax. smoothing: token-label smoothing. token_mix:
    follow (CutMix boxes patch-aligned, token labels follow the pixels; mixup blends them) or none
    (tokens keep their own image's labels, as the reference). beta: weight of the token loss, Eq. 5.
    """

    mode: str = "gumbel"
    tau: float = 1.0  # softmax mode only: hard Gumbel draws ignore it (docs/design.md "The sampler")
    smoothing: float = 0.1
    token_mix: str = "follow"
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in TOKEN_MODES:
            raise TrainConfigError(f"tokens.mode must be one of {TOKEN_MODES}, got {self.mode!r}")
        if self.token_mix not in TOKEN_MIXES:
            raise TrainConfigError(f"tokens.token_mix must be one of {TOKEN_MIXES}, got {self.token_mix!r}")
        if not float(self.tau) > 0:
            raise TrainConfigError(f"tokens.tau must be > 0, got {self.tau!r}")
        _unit(self.smoothing, "tokens.smoothing")
        if float(self.beta) < 0:
            raise TrainConfigError(f"tokens.beta must be >= 0, got {self.beta!r}")
