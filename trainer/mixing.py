"""Token-label-aware Mixup / CutMix (docs/design.md "Token labels at train time").

Our own rather than timm's `Mixup`, because that one returns only (images, targets) and hides the
box and lam, which the token targets need. We still use timm's pieces: `cutmix_bbox_and_lam` for
the box (drawn on the student's token grid, so it is patch-aligned) and `mixup_target` for the
smoothed class targets. Batch mode, partner = the batch reversed (`flip(0)`), as timm.

token_mix="follow": CutMix pastes the partner's token targets inside the box (they follow the
pixels), Mixup blends them with the same lam. token_mix="none": token targets stay as they were
(the reference's behaviour).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from trainer.data_config import DataConfig
from trainer.student_augment import seeded_global_random


@dataclass(frozen=True)
class MixParams:
    """What one batch gets: kind "none" | "mixup" | "cutmix", lam (weight of each sample's own
    content), and for CutMix the box (top, bottom, left, right) in token-grid units."""

    kind: str = "none"
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def draw_mix(cfg: DataConfig, grid: tuple[int, int], rng: np.random.Generator) -> MixParams:
    """Draw one batch's mixing from `rng` (timm's batch mode: mix with prob mix_prob; CutMix with
    switch_prob when both are on; lam ~ Beta(α, α); the CutMix lam is corrected to the box area)."""
    if not cfg.mixing or rng.random() >= cfg.mix_prob:
        return MixParams()
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < cfg.switch_prob)
    if not use_cutmix:
        return MixParams("mixup", float(rng.beta(cfg.mixup, cfg.mixup)))
    lam = float(rng.beta(cfg.cutmix, cfg.cutmix))
    with seeded_global_random(np.random.SeedSequence(int(rng.integers(2**63)))):  # timm draws the box from np.random
        (t, b, l, r), lam = cutmix_bbox_and_lam(tuple(grid), lam, correct_lam=True)
    return MixParams("cutmix", float(lam), (int(t), int(b), int(l), int(r)))


def _blend(x: torch.Tensor, lam: float, inplace: bool) -> torch.Tensor:
    partner = x.flip(0)  # a copy, taken before x changes
    return (x.mul_(lam) if inplace else x.mul(lam)).add_(partner, alpha=1.0 - lam)


def _paste(x: torch.Tensor, region: tuple, inplace: bool) -> torch.Tensor:
    out = x if inplace else x.clone()
    out[region] = x[region].flip(0)  # only the box is copied
    return out


def mix_images(images: torch.Tensor, mix: MixParams, grid: tuple[int, int], inplace: bool = False) -> torch.Tensor:
    """Mix a (B, C, H, W) float batch with its reverse; the CutMix box is scaled from tokens to pixels."""
    if mix.kind == "mixup":
        return _blend(images, mix.lam, inplace)
    if mix.kind == "cutmix":
        ph, pw = patch_size(tuple(images.shape[-2:]), grid)
        t, b, l, r = mix.box
        return _paste(images, (Ellipsis, slice(t * ph, b * ph), slice(l * pw, r * pw)), inplace)
    return images


def mix_class_targets(labels: torch.Tensor, num_classes: int, mix: MixParams, smoothing: float) -> torch.Tensor:
    """(B,) class ids → (B, C) mixed, smoothed targets (timm's mixup_target)."""
    return mixup_target(labels, num_classes, lam=mix.lam, smoothing=smoothing)


def mix_token_targets(tokens: torch.Tensor, mix: MixParams, grid: tuple[int, int], token_mix: str,
                      inplace: bool = False) -> torch.Tensor:
    """(B, gh·gw, C) row-major token targets, mixed like the pixels (follow) or left alone (none)."""
    if token_mix == "none" or mix.kind == "none":
        return tokens
    if mix.kind == "mixup":
        return _blend(tokens, mix.lam, inplace)
    gh, gw = grid
    b, n, c = tokens.shape
    if n != gh * gw:
        raise ValueError(f"token targets have {n} tokens, the grid {gh}x{gw} has {gh * gw}")
    t, bo, l, r = mix.box
    out = _paste(tokens.reshape(b, gh, gw, c), (slice(None), slice(t, bo), slice(l, r)), inplace)
    return out.reshape(b, n, c)  # use the return value: a non-contiguous input is mixed in a copy


def patch_size(image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Pixels per token; the image must tile the grid exactly for a patch-aligned box."""
    (h, w), (gh, gw) = image_hw, grid
    if h % gh or w % gw:
        raise ValueError(f"input {h}x{w} does not tile the token grid {gh}x{gw}: patch-aligned CutMix needs "
                         f"whole patches")
    return h // gh, w // gw
