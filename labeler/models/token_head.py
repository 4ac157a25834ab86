"""Turns any timm classifier into a token model: forward_tokens(x) -> (cls logits, per-patch logits).

Two kinds of backbone:
- token backbones (ViT/DeiT-style: `patch_embed` + `num_prefix_tokens`): patch tokens are the rows of
  `forward_features` after the prefix tokens; the grid comes from `patch_embed` (never sqrt(N)).
- CNNs (ConvNeXt, EfficientNet, ResNet...): every position of the final feature map is a token. Each
  position is fed, as a 1x1 map, through the model's own `forward_head`, so pooling is the identity and the
  classifier (with any head norm) is applied per position: class activation maps (CAM, Zhou et al. 2016).
  This turns a pretrained classifier into a labeler (STL paper, Table 9).

Token-head modes: "classifier" reuses the model's classifier at every token (labelers); "fresh" adds a new
Linear on the pre-logit features of every token (students); "auto" picks "fresh" for token backbones and
"classifier" for CNNs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

TOKEN_HEAD_MODES = ("auto", "fresh", "classifier")


def _is_token_backbone(model: nn.Module) -> bool:
    return hasattr(model, "num_prefix_tokens") and hasattr(getattr(model, "patch_embed", None), "grid_size")


class TokenHeadWrapper(nn.Module):
    """Wraps a timm model (`self.model`) and adds per-patch logits, row-major over the token grid.

    forward(x) -> class logits (B, C), as the wrapped model (timm's contract);
    forward_tokens(x) -> (class logits (B, C), token logits (B, gh*gw, C)), as FAN `_token` models.
    """

    def __init__(self, model: nn.Module, token_head: str = "auto"):
        super().__init__()
        if token_head not in TOKEN_HEAD_MODES:
            raise ValueError(f"token_head must be one of {TOKEN_HEAD_MODES}, got {token_head!r}")
        for attr in ("forward_features", "forward_head", "num_classes"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(model).__name__} is not a timm classifier (no `{attr}`)")
        if model.num_classes <= 0:
            raise ValueError(f"{type(model).__name__} has no classifier (num_classes={model.num_classes})")
        self.model = model
        self.is_token_backbone = _is_token_backbone(model)
        self.num_prefix_tokens = int(model.num_prefix_tokens) if self.is_token_backbone else 0
        self.num_classes = model.num_classes
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        if token_head == "auto":
            token_head = "fresh" if self.is_token_backbone else "classifier"
        self.token_head_mode = token_head
        if token_head == "fresh":
            features = getattr(model, "head_hidden_size", None) or model.num_features
            self.token_head = nn.Linear(features, self.num_classes)
            nn.init.trunc_normal_(self.token_head.weight, std=0.02)
            nn.init.zeros_(self.token_head.bias)
        self._grid_cache: dict[tuple[int, int], tuple[int, int]] = {}

    # ---- grid -------------------------------------------------------------------------------------------
    def token_grid(self, hw: Sequence[int]) -> tuple[int, int]:
        """(gh, gw) of the token logits for an input of size hw = (h, w)."""
        hw = (int(hw[0]), int(hw[1]))
        if self.is_token_backbone:
            return self._patch_grid(hw)
        if hw not in self._grid_cache:
            self._grid_cache[hw] = self._probe_cnn_grid(hw)
        return self._grid_cache[hw]

    def _patch_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        if hasattr(self.model, "token_grid"):
            return tuple(self.model.token_grid(hw))
        pe = self.model.patch_embed
        if tuple(pe.img_size) == hw:
            return tuple(pe.grid_size)
        if getattr(self.model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(hw))
        raise ValueError(f"{type(self.model).__name__} was built for {tuple(pe.img_size)} inputs, got {hw}; "
                         f"create it with img_size={hw} or dynamic_img_size=True")

    @torch.no_grad()
    def _probe_cnn_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        # Padding rules differ per CNN ('same' pads ceil, plain convs floor): measure instead of guessing,
        # in eval mode so BatchNorm running statistics are not touched.
        p = next(self.model.parameters())
        in_chans = self.pretrained_cfg.get("input_size", (3,))[0]
        modes = [m.training for m in self.model.modules()]
        self.model.eval()
        try:
            f = self.model.forward_features(torch.zeros(1, in_chans, *hw, device=p.device, dtype=p.dtype))
        finally:
            for m, mode in zip(self.model.modules(), modes):
                m.training = mode
        self._check_feature_map(f)
        return int(f.shape[2]), int(f.shape[3])

    def _check_feature_map(self, feats: torch.Tensor) -> None:
        if feats.ndim != 4 or feats.shape[1] != self.model.num_features:
            # e.g. Swin/MaxViT return (B, H, W, C): reading that as NCHW would silently mix positions
            raise TypeError(f"{type(self.model).__name__}.forward_features gave {tuple(feats.shape)}, not "
                            f"(B, {self.model.num_features}, H, W); only NCHW feature maps are supported")

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        cls_logits = self.model.forward_head(feats)
        if self.is_token_backbone:
            tokens = self._vit_tokens(feats, x.shape[-2:])
        else:
            tokens = self._cnn_tokens(feats)
        return cls_logits, tokens

    def _vit_tokens(self, feats: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
        if feats.ndim != 3:
            raise TypeError(f"{type(self.model).__name__}.forward_features gave {tuple(feats.shape)}; "
                            "expected (B, tokens, D)")
        tokens = feats[:, self.num_prefix_tokens:]
        gh, gw = self.token_grid(hw)
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"{type(self.model).__name__}: {tokens.shape[1]} patch tokens, grid {gh}x{gw} "
                             f"for input {tuple(hw)}")
        tokens = getattr(self.model, "fc_norm", nn.Identity())(tokens)
        if self.token_head_mode == "fresh":
            return self.token_head(tokens)
        return self.model.get_classifier()(tokens)

    def _cnn_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        self._check_feature_map(feats)
        b, c, h, w = feats.shape
        per_position = feats.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        if self.token_head_mode == "fresh":
            out = self.token_head(self.model.forward_head(per_position, pre_logits=True))
        else:
            out = self.model.forward_head(per_position)
        return out.reshape(b, h * w, -1)

    # ---- timm model interface (so optimizers, EMA and checkpointing see through the wrapper) --------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{name}" for name in inner}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
