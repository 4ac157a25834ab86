"""`TokenForward`: a module whose `forward` is a token model's `forward_tokens`.

DDP and torch.compile only hook `forward`, and a token model's `forward` returns class logits alone (timm's
contract, docs/models.md). Wrap the token model in `TokenForward` before DDP / compile to train on both
outputs; it holds no parameters of its own, so checkpoints are taken from the inner model.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class TokenForward(nn.Module):
    """forward(x) = model.forward_tokens(x) -> (cls logits (B, C), token logits (B, T, C))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "forward_tokens", None)):
            raise TypeError(f"{type(model).__name__} has no forward_tokens (build it with create_token_model)")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_tokens(x)

    def token_grid(self, hw: Sequence[int]) -> tuple[int, int]:
        return self.model.token_grid(hw)
