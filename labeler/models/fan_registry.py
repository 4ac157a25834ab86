"""Registers FAN-Hybrid sizes (and their `_token` twins) in timm's model registry.

Sizes from docs/models.md ("small_12" has 10 blocks and "large_16" 22: the names are historical).
`fan_test_p4_hybrid[_token]` is our tiny 64-px config for CPU tests; it is the architecture of
tests/data/fan_mini_golden (so the golden weights load into it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from labeler.models.fan_hybrid import FAN_HYBRID_STRIDE, FanHybrid


@dataclass(frozen=True)
class FanSize:
    """Architecture of one registered FAN-Hybrid size (the arguments that differ between sizes)."""

    embed_dim: int
    depth: int
    num_heads: int
    backbone_depths: tuple[int, int] = (3, 3)
    backbone_dims: tuple[int, int] = (128, 256)
    img_size: int = 224

    def __post_init__(self):
        if min(self.embed_dim, self.depth, self.num_heads, *self.backbone_depths, *self.backbone_dims) <= 0:
            raise ValueError(f"FanSize values must be positive: {self}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"FanSize: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if len(self.backbone_depths) != 2 or len(self.backbone_dims) != 2:
            raise ValueError(f"FanSize: FAN-Hybrid has two ConvNeXt stages, got {self}")
        if self.img_size % FAN_HYBRID_STRIDE:
            raise ValueError(f"FanSize: img_size {self.img_size} is not a multiple of {FAN_HYBRID_STRIDE}")

    def model_args(self) -> dict:
        return asdict(self)


FAN_SIZES: dict[str, FanSize] = {
    "fan_tiny_8_p4_hybrid": FanSize(embed_dim=192, depth=8, num_heads=8),
    "fan_small_12_p4_hybrid": FanSize(embed_dim=384, depth=10, num_heads=8),
    "fan_base_16_p4_hybrid": FanSize(embed_dim=448, depth=16, num_heads=8),
    "fan_large_16_p4_hybrid": FanSize(embed_dim=480, depth=22, num_heads=10, backbone_depths=(3, 5)),
    "fan_test_p4_hybrid": FanSize(embed_dim=64, depth=2, num_heads=4, backbone_depths=(1, 1),
                                  backbone_dims=(32, 64), img_size=64),
}


def _cfg(img_size: int) -> dict:
    return dict(
        url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None,
        crop_pct=1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.backbone.stem.0", classifier="head",
    )


# timm reads `default_cfgs` of the registering module: each name gets its own pretrained_cfg (no weights
# to download: `url` is empty; load released checkpoints with labeler.models.load_checkpoint).
default_cfgs = generate_default_cfgs({
    name + suffix: _cfg(size.img_size) for name, size in FAN_SIZES.items() for suffix in ("", "_token")
})


def _create_fan(name: str, pretrained: bool, token_head: bool, **kwargs) -> FanHybrid:
    size = FAN_SIZES[name.removesuffix("_token")]
    # features_only=True wraps the model in timm's getter over forward_intermediates (as for XCiT/CaiT).
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", size.depth)))
    model_args = {**size.model_args(), "token_head": token_head, **kwargs}
    return build_model_with_cfg(FanHybrid, name, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **model_args)


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_tiny_8_p4_hybrid", pretrained, False, **kwargs)


@register_model
def fan_tiny_8_p4_hybrid_token(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_tiny_8_p4_hybrid_token", pretrained, True, **kwargs)


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_small_12_p4_hybrid", pretrained, False, **kwargs)


@register_model
def fan_small_12_p4_hybrid_token(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_small_12_p4_hybrid_token", pretrained, True, **kwargs)


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_base_16_p4_hybrid", pretrained, False, **kwargs)


@register_model
def fan_base_16_p4_hybrid_token(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_base_16_p4_hybrid_token", pretrained, True, **kwargs)


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_large_16_p4_hybrid", pretrained, False, **kwargs)


@register_model
def fan_large_16_p4_hybrid_token(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_large_16_p4_hybrid_token", pretrained, True, **kwargs)


@register_model
def fan_test_p4_hybrid(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_test_p4_hybrid", pretrained, False, **kwargs)


@register_model
def fan_test_p4_hybrid_token(pretrained: bool = False, **kwargs) -> FanHybrid:
    return _create_fan("fan_test_p4_hybrid_token", pretrained, True, **kwargs)
