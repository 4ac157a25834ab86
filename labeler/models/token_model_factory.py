"""`create_token_model` and `token_grid`: one entry point for FAN token models and wrapped timm models."""
from __future__ import annotations

from typing import Sequence

import timm
import torch.nn as nn

from labeler.models.fan_hybrid import FanHybrid
from labeler.models.fan_registry import FAN_SIZES
from labeler.models.token_head import TokenHeadWrapper


def create_token_model(name: str, num_classes: int, pretrained: bool = False, token_head: str = "auto",
                       **kwargs) -> nn.Module:
    """A model whose forward returns (cls logits (B, C), token logits (B, gh*gw, C), row-major).

    FAN `_token` names build the FAN-Hybrid token model; any other timm name is built by timm and wrapped
    in `TokenHeadWrapper(token_head=...)`. `kwargs` go to `timm.create_model` (e.g. drop_path_rate).
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if name in FAN_SIZES:
        raise ValueError(f"{name!r} is the plain FAN classifier; use {name + '_token'!r} for a token model")
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not in timm's registry (FAN names: "
                         f"{', '.join(n + '_token' for n in FAN_SIZES)})")
    if pretrained and name.removesuffix("_token") in FAN_SIZES:
        raise ValueError(f"{name!r} has no downloadable weights; build it with pretrained=False and "
                         "call load_checkpoint(model, path)")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if isinstance(model, FanHybrid) and model.token_head:
        if token_head not in ("auto", "fresh"):
            raise ValueError(f"{name!r} has its own token head (aux_head); token_head={token_head!r} unsupported")
        return model
    return TokenHeadWrapper(model, token_head=token_head)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile keeps the module in `_orig_mod`; DDP/DataParallel in `module`.
    while not hasattr(model, "token_grid"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} is not a token model (build it with create_token_model)")
        model = inner
    return model


def token_grid(model: nn.Module, hw: Sequence[int]) -> tuple[int, int]:
    """(gh, gw) of `model`'s token logits for inputs of size hw = (h, w); token logits are gh*gw rows."""
    if len(hw) != 2:
        raise ValueError(f"hw must be (height, width), got {hw!r}")
    return tuple(int(v) for v in _unwrap(model).token_grid(hw))
