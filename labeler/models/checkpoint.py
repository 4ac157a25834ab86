"""Load the weights users bring (timm checkpoint dicts, plain state dicts, .safetensors) into a model.

`load_checkpoint` returns the file's sha256 for the label store's provenance (`LabelerSpec.checkpoint_sha256`).
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from labeler.errors import CheckpointError
from labeler.models.token_head import TokenHeadWrapper

# Where timm-style training scripts keep the weights, in order of preference.
EMA_KEYS = ("state_dict_ema", "model_ema")
MAIN_KEYS = ("state_dict", "model")
# Prefixes added by wrappers at save time: DDP/DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where a file keeps its classifier (rows = classes): FAN heads first, then timm's usual names.
CLASSIFIER_NAMES = ("head", "aux_head", "head.fc", "classifier", "fc")
# Globals a timm checkpoint needs besides tensors: the pickled argparse `args` (docs/design.md "Library behaviour").
SAFE_GLOBALS = [argparse.Namespace]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> Mapping:
    """The raw object in `path`: a dict of tensors (.safetensors) or whatever torch.save stored.

    Pickles load with `weights_only=True` plus an allow-list for argparse.Namespace, so a timm file with
    `args` loads on torch >= 2.6 without trusting arbitrary code; `allow_unsafe_pickle=True` lifts the
    restriction for files you trust that hold other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds Python objects outside the safe allow-list ({e}). "
            "If you trust the file, pass allow_unsafe_pickle=True.") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read by torch.load ({e})") from e


def select_state_dict(obj: Mapping, prefer_ema: bool = True, source: str = "<checkpoint>") -> dict:
    """The state dict inside a checkpoint object: EMA weights first when `prefer_ema` (teachers)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a dict")
    order = EMA_KEYS + MAIN_KEYS if prefer_ema else MAIN_KEYS + EMA_KEYS
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            return dict(inner)
        if isinstance(inner, nn.Module):
            return inner.state_dict()
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(f"checkpoint {source} holds no state dict: top-level keys {sorted(map(str, obj))[:20]}; "
                          f"expected one of {list(order)} or a plain name -> tensor mapping")


def convert_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes; rename `pos_embeder.` -> `pos_embed.`; split fused class-attention `qkv`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key.startswith("pos_embeder."):
            key = "pos_embed." + key[len("pos_embeder."):]
        if key.startswith("cls_attn_blocks.") and ".attn.qkv." in key:
            # Older files fuse the class-attention q, k, v projections (rows stacked q, k, v).
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[key.replace(".attn.qkv.", f".attn.{name}.")] = part
            continue
        out[key] = value
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or misshaped):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:30])
        more = f"\n    ... and {len(items) - 30} more" if len(items) > 30 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}" if items else ""

    raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}:"
                          + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                          + listing("shape mismatches", misshaped))


def _load_target(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    # A TokenHeadWrapper takes either its own state dict or its inner classifier's (the token head keeps
    # its init: "classifier" mode has no extra weights, "fresh" heads are trained from scratch).
    if isinstance(model, TokenHeadWrapper) and not any(k.startswith("model.") for k in state):
        return model.model
    return model


def read_state(path: str | Path, prefer_ema: bool = True, allow_unsafe_pickle: bool = False) -> dict:
    """The state dict in `path` (read once): timm checkpoint dicts (`state_dict_ema`/`model_ema` preferred when
    `prefer_ema`, else `state_dict`/`model`), plain state dicts and .safetensors files; legacy keys converted."""
    return convert_legacy_keys(select_state_dict(read_checkpoint(path, allow_unsafe_pickle), prefer_ema, str(path)))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a `read_state` result into `model` (strict: every key, every shape; nothing copied unless all fits)."""
    target = _load_target(model, state)
    check_state_dict(target, state, source)
    target.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path, prefer_ema: bool = True,
                    allow_unsafe_pickle: bool = False) -> str:
    """Load `path` into `model` (`read_state` + `load_state`) and return the file's sha256 (hex)."""
    load_state(model, read_state(path, prefer_ema, allow_unsafe_pickle), str(path))
    return file_sha256(path)


def state_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """The rows of the state dict's classifier weight, None when it has none we know.

    Looks for the classifier names of our FAN models (`head`, `aux_head`) and of timm backbones (`head.fc`,
    `classifier`, `fc`), also under the `model.` prefix of a TokenHeadWrapper's own state dict.
    """
    for name in CLASSIFIER_NAMES:
        for key in (f"{name}.weight", f"model.{name}.weight"):
            weight = state.get(key)
            if isinstance(weight, torch.Tensor) and weight.ndim >= 1:
                return int(weight.shape[0])
    return None
