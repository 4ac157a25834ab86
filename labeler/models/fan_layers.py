"""The FAN block: token-mixing self-attention + attentional channel processing.

Written from the FAN paper (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022)
and the facts in docs/models.md; module and parameter names follow the released checkpoints so they load as-is.
timm has no FAN block, so these small modules are ours; norms, DropPath and init come from timm.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

# FAN-block and class-attention norms use eps 1e-6; the channel-processing value norm keeps
# nn.LayerNorm's 1e-5 (golden fan_mini_golden.md, "Norm epsilons").
LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class TokenMixingAttention(nn.Module):
    """Multi-head self-attention over tokens with separate `q` and fused `kv` projections."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        # SDPA's default scale is head_dim ** -0.5, the scale FAN uses.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def depthwise_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The depthwise 3x3 convolution of `nn.Conv2d(C, C, 3, padding=1, groups=C)` on channels-last tokens:
    x (B, H, W, C), weight (C, 1, 3, 3), bias (C,) -> (B, H, W, C), as nine shifted multiply-adds.

    torch.compile turns this into one stencil kernel and fuses it with the elementwise ops around it (the
    GELU and BatchNorm of the branch, the residual); cuDNN's depthwise kernels are separate passes, the
    largest share of a FAN forward's convolution time. Eagerly it is nine passes: eager calls keep cuDNN
    (`DepthwiseConvBranch`). Weights are cast to x's dtype, as autocast casts a convolution's."""
    b, h, w, c = x.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))  # a zero pixel around H and W, as padding=1
    taps = weight.reshape(c, 9).to(x.dtype)
    out = padded[:, 0:h, 0:w] * taps[:, 0]
    for i in range(1, 9):
        dy, dx = divmod(i, 3)
        out = out + padded[:, dy:dy + h, dx:dx + w] * taps[:, i]
    return out if bias is None else out + bias.to(x.dtype)


class DepthwiseConvBranch(nn.Module):
    """Depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv on the token grid (`dwconv`).

    Under torch.compile the two convolutions are written as stencils (`depthwise_conv3x3`) so the compiler
    fuses the branch into a few kernels; `stencil_when_compiled = False` keeps the convolutions there too
    (`set_depthwise_impl`). Same parameters and checkpoints either way."""

    stencil_when_compiled = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips this block: no stencils there
            if self.stencil_when_compiled and torch.compiler.is_compiling():
                return self._stencils(x, hw)
        b, n, c = x.shape
        # (B, N, C) -> (B, C, H, W) as a channels-last view: no copy.
        y = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        y = self.conv2(self.bn(self.act(self.conv1(y))))
        return y.flatten(2).transpose(1, 2)

    @torch.jit.unused
    def _stencils(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        y = depthwise_conv3x3(x.reshape(b, hw[0], hw[1], c), self.conv1.weight, self.conv1.bias)
        y = self.bn(self.act(y).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # BatchNorm2d wants (B, C, H, W)
        return depthwise_conv3x3(y, self.conv2.weight, self.conv2.bias).reshape(b, n, c)


def set_depthwise_impl(model: nn.Module, impl: str) -> nn.Module:
    """How `model`'s FAN depthwise branches run under torch.compile: "stencil" (the default: fused by the
    compiler) or "conv" (the convolutions, cuDNN on a GPU, as eagerly). Call before compiling; returns `model`."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, DepthwiseConvBranch):
            m.stencil_when_compiled = impl == "stencil"
    return model


DEPTHWISE_IMPLS = ("stencil", "conv")


class ConvMlp(nn.Module):
    """FAN's value MLP (`mlp_v`): fc1, a layer-scaled residual depthwise-conv branch, fc2.

    There is no activation between fc1 and fc2 apart from the one inside the conv branch (docs/models.md).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(hidden))
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConvBranch(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        # x + gamma * branch in one fused multiply-add (one pass over the 4d-wide activation, not two), in
        # the activation's dtype: an fp32 gamma would upcast it under autocast, only for fc2 to cast it back.
        x = torch.addcmul(x, self.gamma.to(x.dtype), self.drop(self.dwconv(x, hw)))
        return self.drop(self.fc2(x))


class ChannelProcessing(nn.Module):
    """Attentional channel processing: one sigmoid gate per channel scales a normalised value.

    Per head, the query q(x) and the key x are both soft-maxed over tokens; the key is averaged over the
    head's channels (one weight per token), so q·k gives one score per channel; the gate is
    sigmoid(score) * temperature (docs/models.md; the golden outputs confirm the temperature sits outside).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by channel heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm_v = nn.LayerNorm(dim)  # eps 1e-5 on purpose (see LayerNormEps6)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)

    def gate_and_value(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate (B, 1, C), value (B, N, C)); the output is gate * value. The gate is small, so callers fold
        their own per-channel scale into it instead of making another pass over the value."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).softmax(dim=1)
        k = x.reshape(b, n, h, c // h).softmax(dim=1).mean(dim=3)  # (B, N, heads)
        score = torch.einsum("bnhd,bnh->bhd", q, k)
        gate = torch.sigmoid(score) * self.temperature.reshape(1, h, 1)
        gate = self.attn_drop(gate).reshape(b, 1, c)
        return gate, self.norm_v(self.mlp_v(x, hw))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        gate, value = self.gate_and_value(x, hw)
        return gate * value


class FanBlock(nn.Module):
    """x += drop_path(gamma1 * attn(norm1 x)); x += drop_path(gamma2 * mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, channel_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, eta: float = 1.0):
        super().__init__()
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.norm1 = LayerNormEps6(dim)
        self.attn = TokenMixingAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNormEps6(dim)
        self.mlp = ChannelProcessing(dim, channel_heads, mlp_ratio, qkv_bias, attn_drop, drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        # Drop-path scales whole samples, so it commutes with the per-channel gammas and the gate: each
        # residual is one fused multiply-add, and gamma2 folds into the (B, 1, C) gate, not the activation.
        x = torch.addcmul(x, self.gamma1, self.drop_path(self.attn(self.norm1(x))))
        gate, value = self.mlp.gate_and_value(self.norm2(x), hw)
        return torch.addcmul(x, gate * self.gamma2, self.drop_path(value))
