"""Student-only augmentation: photometric RandAugment (per sample, in the data workers) and random
erasing (per batch, on the training device).

The geometric RandAugment ops (rotate, shear, translate) are part of the stored view the teacher
saw, so the student gets only the colour ops here; timm's RandAugment does the work, given an
explicit transform list. timm's ops draw from the global `random` / `np.random`; we reseed both
from (run seed, epoch, row) around each call and put the caller's state back, so a sample's
augmentation is the same whatever worker or rank draws it, and replayable on resume.
"""
from __future__ import annotations

import random
import re
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing  # not exported by timm.data

# Colour/tone ops of timm's RandAugment sets; geometric ones (Rotate, ShearX/Y, TranslateX/YRel)
# are deliberately absent: they are in the view.
PHOTOMETRIC_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness")
PHOTOMETRIC_OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing")

_AUG_TAG = 0x4155_4732  # "AUG2": separates this stream from the view choice on the same run seed


@contextmanager
def seeded_global_random(seed_seq: np.random.SeedSequence, torch_cpu: bool = False):
    """Run timm code that uses the global `random` / `np.random` (and, with torch_cpu, torch's CPU
    generator: torchvision's flips) with a private, reproducible seed; the caller's state comes back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    a, b, c = seed_seq.generate_state(3)
    if torch_cpu:
        torch_state = torch.get_rng_state()
        torch.manual_seed(int(c))
    random.seed(int(a))
    np.random.seed(int(b))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if torch_cpu:
            torch.set_rng_state(torch_state)


def sample_seed(run_seed: int, epoch: int, *ids: int) -> np.random.SeedSequence:
    """The seed of one sample's augmentation in one epoch (ids: its store row, or shard + key hash)."""
    return np.random.SeedSequence(int(run_seed), spawn_key=(_AUG_TAG, int(epoch), *(int(i) for i in ids)))


def keep_posterize_bits_positive(transform):
    """Clamp posterize to >= 1 bit in every timm RandAugment inside `transform` (returned, changed in place).

    timm's PosterizeIncreasing asks for 0 bits at magnitude 10 (reachable with m9 mstd0.5), which
    Pillow >= 13 rejects. Clamping that one op keeps the paper's magnitude distribution for all the
    others (capping every op with mmax9 would clip half of the N(9, 0.5) draws).
    """
    ops = getattr(transform, "ops", None)
    if ops is not None and all(hasattr(op, "level_fn") for op in ops):
        for op in ops:
            if op.name.startswith("Posterize") and op.level_fn is not None:
                op.level_fn = _at_least_one_bit(op.level_fn)
    for child in getattr(transform, "transforms", ()):  # torchvision Compose
        keep_posterize_bits_positive(child)
    return transform


class _at_least_one_bit:
    """Picklable wrapper (DataLoader workers) of a posterize level function."""

    def __init__(self, level_fn):
        self.level_fn = level_fn

    def __call__(self, magnitude, hparams):
        (bits,) = self.level_fn(magnitude, hparams)
        return (max(1, int(bits)),)


def photometric_ops(config_str: str) -> tuple[str, ...]:
    """The op list matching the config's `inc` flag (timm picks the *Increasing variants for inc1)."""
    m = re.search(r"-inc(\d+)", config_str)
    return PHOTOMETRIC_OPS_INCREASING if m and int(m.group(1)) else PHOTOMETRIC_OPS


class StudentAugment:
    """Photometric RandAugment on a rendered view (PIL RGB in, PIL RGB out)."""

    def __init__(self, config_str: str, fill: tuple[int, int, int] = (124, 116, 104)):
        self.config_str = config_str
        self.ops = photometric_ops(config_str)
        # img_mean: fill colour for ops that need one (none of the photometric ones, kept for safety).
        self._ra = keep_posterize_bits_positive(rand_augment_transform(
            config_str, {"img_mean": tuple(int(v) for v in fill)}, transforms=list(self.ops)))

    def __call__(self, img: Image.Image, seed_seq: np.random.SeedSequence) -> Image.Image:
        with seeded_global_random(seed_seq):
            return self._ra(img)

    def __repr__(self) -> str:
        return f"StudentAugment({self.config_str!r}, ops={list(self.ops)})"


def build_random_erasing(probability: float, mode: str, device):
    """timm's RandomErasing for a normalised (B, 3, H, W) batch on `device`; None when disabled."""
    if probability <= 0:
        return None
    return RandomErasing(probability=probability, mode=mode, max_count=1, num_splits=0, device=str(device))
