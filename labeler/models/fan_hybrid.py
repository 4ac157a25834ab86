"""FAN-Hybrid: a ConvNeXt stem-and-two-stages patch embedding, FAN blocks, class attention, token head.

Implemented from docs/models.md and tests/data/fan_mini_golden.md (clean-room; names match the released
checkpoints). Reused from timm: ConvNeXt stages and LayerNorm2d (standard biased-variance layer norm,
the `stdln_*` decision in the golden), XCiT's Fourier positional encoding and CaiT/XCiT class-attention block.
"""

import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models._features import feature_take_indices  # what timm's own ViTs use; not re-exported
from timm.models.convnext import ConvNeXtStage
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier
from torch.utils.checkpoint import checkpoint

from labeler.models.fan_layers import FanBlock, LayerNormEps6

# Overall stride of the hybrid embedding: stem 4 x downsample 2 x proj 2.
FAN_HYBRID_STRIDE = 16


class ConvNeXtTrunk(nn.Module):
    """ConvNeXt stem + stages without head or final norm (`patch_embed.backbone`), output stride 8."""

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3), dims: Sequence[int] = (128, 256)):
        super().__init__()
        if len(depths) != 2 or len(dims) < 2:
            raise ValueError(f"FAN-Hybrid uses two ConvNeXt stages; got depths={depths}, dims={dims}")
        norm = partial(LayerNorm2d, eps=1e-6)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), norm(dims[0]))
        # conv_mlp=True keeps the MLP as 1x1 convs ([out, in, 1, 1] weights, as in the checkpoints);
        # layer-scale init 1e-6 and no drop-path in the backbone (docs/models.md).
        stage = partial(ConvNeXtStage, conv_mlp=True, ls_init_value=1e-6, norm_layer=norm)
        self.stages = nn.Sequential(
            stage(dims[0], dims[0], stride=1, depth=depths[0]),
            stage(dims[0], dims[1], stride=2, depth=depths[1]),
        )
        self.out_channels = dims[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridPatchEmbed(nn.Module):
    """ConvNeXt trunk then a 2x2 stride-2 conv to the embed dim; returns row-major tokens and the grid."""

    def __init__(self, img_size: int, in_chans: int, embed_dim: int,
                 backbone_depths: Sequence[int], backbone_dims: Sequence[int]):
        super().__init__()
        self.backbone = ConvNeXtTrunk(in_chans, backbone_depths, backbone_dims)
        self.proj = nn.Conv2d(self.backbone.out_channels, embed_dim, kernel_size=2, stride=2)
        self.img_size = (img_size, img_size)
        self.patch_size = (FAN_HYBRID_STRIDE, FAN_HYBRID_STRIDE)
        self.grid_size = fan_grid(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.backbone(x))
        hw = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), hw


def fan_grid(hw: Sequence[int]) -> tuple[int, int]:
    """Token grid for an input of size hw: the stem and both stride-2 convs floor, so floor(h/16)."""
    h, w = int(hw[0]), int(hw[1])
    if h < FAN_HYBRID_STRIDE or w < FAN_HYBRID_STRIDE:
        raise ValueError(f"input {h}x{w} is smaller than the FAN-Hybrid stride {FAN_HYBRID_STRIDE}")
    return h // FAN_HYBRID_STRIDE, w // FAN_HYBRID_STRIDE


class FanHybrid(nn.Module):
    """FAN-Hybrid classifier; with `token_head=True` also a per-patch classifier (`aux_head`).

    timm's contract: `forward(x)` returns class logits (B, C) for every model. Token models add
    `forward_tokens(x) -> (cls logits (B, C), token logits (B, gh*gw, C) row-major)` (docs/models.md).
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 8,
        channel_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backbone_depths: Sequence[int] = (3, 3),
        backbone_dims: Sequence[int] = (128, 256),
        cls_attn_layers: int = 2,
        eta: float = 1.0,
        token_head: bool = False,
        head_init_scale: float = 1.0,
        global_pool: str = "token",
    ):
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"FAN-Hybrid classifies from its class token; global_pool={global_pool!r} unsupported")
        if img_size % FAN_HYBRID_STRIDE:
            raise ValueError(f"img_size {img_size} must be a multiple of {FAN_HYBRID_STRIDE}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token, prepended after the FAN blocks
        self.token_head = token_head
        self.grad_checkpointing = False
        channel_heads = channel_heads or num_heads

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = HybridPatchEmbed(img_size, in_chans, embed_dim, backbone_depths, backbone_dims)
        self.pos_embed = PositionalEncodingFourier(hidden_dim=32, dim=embed_dim, temperature=10000)
        self.pos_drop = nn.Dropout(drop_rate)
        # One constant drop-path rate for every FAN block (docs/models.md); none in class attention.
        self.blocks = nn.ModuleList([
            FanBlock(embed_dim, num_heads, channel_heads, mlp_ratio, qkv_bias, proj_drop_rate,
                     attn_drop_rate, drop_path_rate, eta)
            for _ in range(depth)
        ])
        # timm's XCiT class-attention block is the FAN one (checked against the golden outputs, 3e-6),
        # including its residual that re-adds the normalised patch tokens after `norm2`; its attention
        # runs through F.scaled_dot_product_attention (timm's fused_attn).
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                                attn_drop=attn_drop_rate, norm_layer=LayerNormEps6, eta=eta, tokens_norm=True)
            for _ in range(cls_attn_layers)
        ])
        self.norm = LayerNormEps6(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # None (not a module) on plain models, so TorchScript drops the token branch of forward_head.
        self.aux_head = self._new_aux_head(num_classes) if token_head else None
        self.feature_info = [dict(num_chs=embed_dim, reduction=FAN_HYBRID_STRIDE, module=f"blocks.{i}")
                             for i in range(depth)]
        self._init_weights(head_init_scale)

    def _new_aux_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ---- init -------------------------------------------------------------------------------------------
    def _init_weights(self, head_init_scale: float) -> None:
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                if name.startswith("patch_embed.backbone"):
                    trunc_normal_(m.weight, std=0.02)  # ConvNeXt's own init
                else:
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in (self.head, self.aux_head):
            if isinstance(head, nn.Linear):
                head.weight.data.mul_(head_init_scale)
                head.bias.data.mul_(head_init_scale)

    # ---- timm model interface ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The per-head gate temperature is a 3-D scale (heads, 1, 1), so timm's 1-D rule misses it.
        return {"cls_token", "*.temperature"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^patch_embed|^pos_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^cls_attn_blocks\.(\d+)", (99999,)),
                            (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.patch_embed.backbone.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New class head(s) with `num_classes` outputs (both `head` and `aux_head` for token models);
        0 removes them, so forward returns the pooled class-token features (B, head_hidden_size)."""
        if global_pool not in (None, "", "token"):
            raise ValueError(f"FAN-Hybrid supports only global_pool='token', got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.token_head:
            self.aux_head = self._new_aux_head(num_classes)

    def token_grid(self, hw: Sequence[int]) -> tuple[int, int]:
        """(gh, gw) of the token logits for an input of size hw = (h, w)."""
        return fan_grid(hw)

    # ---- forward ----------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, hw = self.patch_embed(x)
        pos = self.pos_embed(1, hw[0], hw[1]).flatten(2).transpose(1, 2)  # same for every image: broadcast
        return self.pos_drop(x + pos.to(x.dtype)), hw

    def _class_attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            for blk in self.cls_attn_blocks:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, 1 + gh*gw, D); index 0 is the class token."""
        x, hw = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return self._class_attention(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """FAN-block outputs (as timm's XCiT/CaiT): `indices` = last n blocks (int), listed blocks, or all.

        Intermediates are patch tokens only (the class token joins after the FAN blocks), NCHW on the token
        grid or NLC; `norm` applies the final norm to them. Returns (forward_features output, intermediates)
        or only the intermediates.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b = x.shape[0]
        x, hw = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(b, hw[0], hw[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self._class_attention(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the FAN blocks after the last wanted intermediate (and the class stage / heads)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.cls_attn_blocks = nn.ModuleList()
            self.cls_token = None
            self.num_prefix_tokens = 0
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class logits from `forward_features` output; pre_logits gives the class token (B, D).

        A token model's class score adds half the best per-patch score of `aux_head`, as timm's VOLO
        (and token labelling) do; `forward_tokens` returns the two heads' logits separately.
        """
        cls = self.head_drop(x[:, 0])
        if pre_logits:
            return cls
        out = self.head(cls)
        if self.aux_head is not None and self.num_classes > 0:
            out = out + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).amax(dim=1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(class-token logits `head` (B, C), per-patch logits `aux_head` (B, gh*gw, C) row-major)."""
        aux_head = self.aux_head
        if aux_head is None:
            raise TypeError("forward_tokens needs a FAN `_token` model (with aux_head); this is a plain FAN")
        x = self.forward_features(x)
        return self.head(self.head_drop(x[:, 0])), aux_head(x[:, self.num_prefix_tokens:])
