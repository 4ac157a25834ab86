"""Per-token training targets from stored (top-k + tail) teacher logits, on the training device.

Vectorised torch counterpart of `labelstore.sample_token_labels` (the numpy reference; a test
compares the two statistically). Stored per token: the top-k logits and class ids and the
log-sum-exp of every class outside the top-k (`tail_lse`), so the K+1 categories top-k ∪ {tail}
have exact probabilities softmax([topk_logit, tail_lse]).

- gumbel (default; STL's hard Gumbel token labels): one categorical draw per token over the K+1
  categories by Gumbel-max with an explicit torch.Generator (F.gumbel_softmax takes none); a tail
  draw becomes a class drawn uniformly from the C−K classes outside that token's top-k.
- softmax: soft targets softmax(logits / tau); the tail mass is spread evenly over the classes
  outside the top-k (exact at tau = 1; for tau ≠ 1 the tail is treated as one category with logit
  tail_lse, since its inner distribution was not stored).
- argmax: the teacher's top-1 class.
Then resampling to the student's grid in probability space (area pooling when the stored grid is
an integer multiple, else bilinear), and token-label smoothing (1−ε)·y + ε/C.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data_config import TokenLabelConfig


def _categories(logit: torch.Tensor, tail_lse: torch.Tensor | None) -> torch.Tensor:
    """(..., K+1) float32 logits of top-k ∪ {tail} (or (..., C) when dense)."""
    logit = logit.float()
    if tail_lse is None:
        return logit
    return torch.cat([logit, tail_lse.float().unsqueeze(-1)], dim=-1)


def uniform_outside_topk(topk_class: torch.Tensor, num_classes: int, generator=None) -> torch.Tensor:
    """A class drawn uniformly from {0..C-1} minus the K distinct classes of each row of `topk_class`.

    Draw u in [0, C−K) then step over the excluded classes in ascending order: the u-th class not
    in the set is u + #(excluded classes ≤ it). K is small, so K vectorised steps.
    """
    k = topk_class.shape[-1]
    free = num_classes - k
    shape = topk_class.shape[:-1]
    u = torch.randint(0, max(free, 1), shape, generator=generator, device=topk_class.device)
    excluded, _ = topk_class.long().sort(dim=-1)
    out = u
    for j in range(k):
        out = out + (excluded[..., j] <= out).long()
    return out


def draw_gumbel(logit: torch.Tensor, topk_class: torch.Tensor | None, tail_lse: torch.Tensor | None,
                num_classes: int, generator=None) -> torch.Tensor:
    """Hard Gumbel-max token labels, (...,) int64 class ids."""
    cats = _categories(logit, tail_lse)
    noise = torch.empty_like(cats).exponential_(generator=generator).log()
    pick = (cats - noise).argmax(dim=-1)  # argmax(l + G) with G = −log E, E ~ Exp(1)
    if topk_class is None:
        return pick
    k = topk_class.shape[-1]
    in_topk = pick < k
    chosen = torch.gather(topk_class.long(), -1, pick.clamp(max=k - 1).unsqueeze(-1)).squeeze(-1)
    if k >= num_classes:
        return chosen
    tail = uniform_outside_topk(topk_class, num_classes, generator)
    return torch.where(in_topk, chosen, tail)


def argmax_labels(logit: torch.Tensor, topk_class: torch.Tensor | None) -> torch.Tensor:
    """The teacher's top-1 class per token, (...,) int64."""
    best = logit.float().argmax(dim=-1)
    if topk_class is None:
        return best
    return torch.gather(topk_class.long(), -1, best.unsqueeze(-1)).squeeze(-1)


def softmax_targets(logit: torch.Tensor, topk_class: torch.Tensor | None, tail_lse: torch.Tensor | None,
                    num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """Soft targets (..., C) float32 that sum to 1."""
    probs = torch.softmax(_categories(logit, tail_lse) / tau, dim=-1)
    if topk_class is None:
        return probs
    k = topk_class.shape[-1]
    free = num_classes - k
    tail_each = probs[..., k:] / max(free, 1)
    out = tail_each.expand(*probs.shape[:-1], num_classes).clone()
    return out.scatter_(-1, topk_class.long(), probs[..., :k])


def one_hot(ids: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(...,) class ids → (..., C) float32 (1−ε)·onehot + ε/C, written in one pass."""
    off = smoothing / num_classes
    out = torch.full((*ids.shape, num_classes), off, device=ids.device, dtype=torch.float32)
    return out.scatter_(-1, ids.unsqueeze(-1), 1.0 - smoothing + off)


def resample_grid(targets: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh·gw, C) row-major probabilities → (B, sh·sw, C) on the student's grid.

    Area pooling when the stored grid is an integer multiple of the student's (each student patch
    covers whole stored patches), else bilinear — both are convex combinations, so rows still sum to 1.
    """
    (gh, gw), (sh, sw) = tuple(src_grid), tuple(dst_grid)
    b, t, c = targets.shape
    if t != gh * gw:
        raise ValueError(f"token targets have {t} tokens but the stored grid is {gh}x{gw}")
    if (gh, gw) == (sh, sw):
        return targets
    x = targets.transpose(1, 2).reshape(b, c, gh, gw)
    if gh % sh == 0 and gw % sw == 0:
        x = F.avg_pool2d(x, kernel_size=(gh // sh, gw // sw))
    else:
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
    return x.reshape(b, c, sh * sw).transpose(1, 2).contiguous()


def smooth(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of a distribution: (1−ε)·y + ε/C."""
    if smoothing <= 0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def token_targets(logit: torch.Tensor, topk_class: torch.Tensor | None, tail_lse: torch.Tensor | None, *,
                  num_classes: int, cfg: TokenLabelConfig, src_grid: tuple[int, int],
                  dst_grid: tuple[int, int] | None = None, generator=None) -> torch.Tensor:
    """Stored encoded token logits (B, T, K|C) → per-token targets (B, T', C) float32 (T' = student grid)."""
    if topk_class is None and logit.shape[-1] != num_classes:
        raise ValueError(f"dense token logits have {logit.shape[-1]} classes, expected {num_classes}")
    dst_grid = tuple(dst_grid or src_grid)
    if cfg.mode == "softmax":
        targets = softmax_targets(logit, topk_class, tail_lse, num_classes, cfg.tau)
        return smooth(resample_grid(targets, src_grid, dst_grid), cfg.smoothing)
    ids = (draw_gumbel(logit, topk_class, tail_lse, num_classes, generator) if cfg.mode == "gumbel"
           else argmax_labels(logit, topk_class))
    # Smoothing commutes with resampling (convex weights), so it is folded into the one-hot here.
    return resample_grid(one_hot(ids, num_classes, cfg.smoothing), src_grid, dst_grid)
