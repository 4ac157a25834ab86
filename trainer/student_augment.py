"""Student-only augmentation: the photometric slots of the view's RandAugment draw (per sample, in the
data workers) and random erasing (per batch, on the training device).

The view record holds one RandAugment draw (labelstore/views.py); its geometric slots are already in the
rendered pixels the teacher saw, its photometric slots are applied here with timm's own Pillow ops
(trainer/photometric.py), re-drawn per epoch from an explicit Generator seeded by (run seed, epoch, row),
so a sample's augmentation is the same whatever worker or rank draws it, and replayable on resume.
`seeded_global_random` is for timm code that uses the global `random` / `np.random` (stage-1 transforms).
"""
from __future__ import annotations

import random
import re
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing  # not exported by timm.data

from labelstore.views import RA_OPS, ViewSpec
from trainer.batch_erasing import BatchRandomErasing
from trainer.errors import TrainConfigError
from trainer.photometric import apply_photometric_pil, draw_photometric

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


def parse_rand_augment(config_str: str) -> dict:
    """timm's RandAugment config string ('rand-m9-mstd0.5-inc1') → its settings, with timm's defaults."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise TrainConfigError(f"data.rand_augment must start with 'rand', got {config_str!r}")
    out = {"m": 10.0, "n": 2, "mstd": 0.0, "mmax": 10.0, "p": 0.5, "inc": 0}  # timm's rand_augment_transform defaults
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not m or m.group(1) not in out:
            raise TrainConfigError(f"data.rand_augment {config_str!r}: unsupported part {part!r} "
                             f"(known: {', '.join(k + '<x>' for k in out)})")
        out[m.group(1)] = type(out[m.group(1)])(float(m.group(2)))
    return out


class StudentAugment:
    """The photometric slots of each sample's stored RandAugment draw, re-drawn per epoch (PIL RGB in and out).

    The RandAugment draw itself lives in the view (labelstore/views.py); `config_str` (the trainer's
    `data.rand_augment`) must describe the same RandAugment as the store's ViewSpec, else a clear error.
    """

    def __init__(self, config_str: str, view_spec: ViewSpec, redraw: bool = True):
        ra = parse_rand_augment(config_str)
        want = {"m": view_spec.ra_magnitude, "n": view_spec.ra_num_ops, "mstd": view_spec.ra_magnitude_std,
                "mmax": view_spec.ra_magnitude_max, "p": view_spec.ra_prob, "inc": 1}
        diff = [f"{k}: {ra[k]} here vs {want[k]} in the store's views" for k in want
                if not np.isclose(float(ra[k]), float(want[k]))]
        if diff or set(view_spec.ra_ops) != set(RA_OPS):
            raise TrainConfigError(f"data.rand_augment {config_str!r} does not match the RandAugment the label store's "
                             f"views were drawn with ({'; '.join(diff) or 'ops ' + str(view_spec.ra_ops)}); set "
                             f"data.rand_augment to match (inc1 only) or '' for no photometric ops")
        self.config_str, self.view_spec, self.redraw = config_str, view_spec, redraw
        self.ops = view_spec.photometric_ops

    def draw(self, params, seed_seq: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
        """(photo_ops, photo_args) of one sample (trainer/photometric.py), from its own seed."""
        return draw_photometric(params, self.view_spec, np.random.default_rng(seed_seq), redraw=self.redraw)

    def __call__(self, img: Image.Image, params, seed_seq: np.random.SeedSequence) -> Image.Image:
        ops, args = self.draw(params, seed_seq)
        return apply_photometric_pil(img, ops, args)

    def __repr__(self) -> str:
        return f"StudentAugment({self.config_str!r}, ops={list(self.ops)}, redraw={self.redraw})"


def build_random_erasing(probability: float, mode: str, device):
    """timm's RandomErasing for a normalised (B, 3, H, W) batch on `device`, with timm's boxes: on a GPU
    applied to the whole batch at once (`BatchRandomErasing`: a few kernels, not a few per image), on a CPU
    image by image (where a batch-wide noise draw would cost more than the loop); None when disabled."""
    if probability <= 0:
        return None
    erasing = BatchRandomErasing if torch.device(device).type == "cuda" else RandomErasing
    return erasing(probability=probability, mode=mode, max_count=1, num_splits=0, device=str(device))
