"""Training losses of both STL stages, as pure functions of logits and targets.

Targets are probability tensors (mixup/cutmix and label smoothing make them soft), so every term is a
soft-target cross-entropy. Stage 1 (paper Eq. 2) trains the token-labeler from class labels only;
stage 2 (paper Eq. 5) trains the student on the class target plus one token label per patch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossTerms:
    """The total loss and its two parts (detached parts are for logging only)."""

    total: torch.Tensor
    cls: torch.Tensor
    token: torch.Tensor


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all leading dims of −Σ_c target_c · log softmax(logits)_c.

    Computed in float32 whatever the autocast dtype: a bf16 log-softmax over 1000 classes loses the
    small probabilities that label smoothing puts on every class.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(target.float() * log_probs).sum(dim=-1).mean()


def labeler_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor, cls_target: torch.Tensor,
                 alpha: float = 1.0) -> LossTerms:
    """Stage 1, paper Eq. 2: CE(cls head, y) + α · CE(mean over tokens of the per-token logits, y).

    cls_logits (B, C), token_logits (B, T, C), cls_target (B, C). Averaging the token *logits*
    (not their losses) lets each patch specialise while the image-level sum stays correct.
    """
    if token_logits is None:
        raise ValueError("stage 1 (Eq. 2) needs token logits: train a *_token model (e.g. fan_tiny_8_p4_hybrid_token)")
    if token_logits.dim() != 3:
        raise ValueError(f"token_logits must be (B, T, C), got {tuple(token_logits.shape)}")
    cls_term = soft_target_cross_entropy(cls_logits, cls_target)
    token_term = soft_target_cross_entropy(token_logits.mean(dim=1), cls_target)
    return LossTerms(total=cls_term + alpha * token_term, cls=cls_term.detach(), token=token_term.detach())


def student_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor | None, cls_target: torch.Tensor,
                 token_target: torch.Tensor | None, beta: float = 1.0) -> LossTerms:
    """Stage 2, paper Eq. 5: CE(cls head, y) + β · mean over tokens CE(token head_t, token label_t).

    cls_logits/cls_target (B, C); token_logits/token_target (B, T, C). With no token target (or β = 0)
    it is plain class-label training, the "no token labels" baseline.
    """
    cls_term = soft_target_cross_entropy(cls_logits, cls_target)
    if token_target is None or beta == 0.0:
        zero = cls_term.detach() * 0.0
        return LossTerms(total=cls_term, cls=cls_term.detach(), token=zero)
    if token_logits is None:
        raise ValueError("a token target was given but the model produced no token logits (needs a *_token model)")
    token_term = soft_target_cross_entropy(token_logits, token_target)  # mean over B and T
    return LossTerms(total=cls_term + beta * token_term, cls=cls_term.detach(), token=token_term.detach())
