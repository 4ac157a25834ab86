"""Training checkpoints: atomic writes, exact resume, and the timm-style export `stl-labels generate` loads.

A checkpoint is a timm-style dict (`state_dict`, `state_dict_ema`, `epoch`, ...) that also carries what an
exact resume needs: optimizer, scheduler, grad scaler, update count, the data position inside the epoch
(shards already consumed), the resolved config and every RNG state. Everything in it is a tensor or a plain
Python value, so it loads with `torch.load(weights_only=True)` (the torch ≥ 2.6 default).
"""
from __future__ import annotations

import os
import random
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import TrainCheckpointError

LAST = "last.pth"  # written every epoch and on SIGTERM; what --resume reads
EXPORT = "model_ema.pth"  # slim {state_dict, state_dict_ema}: what `stl-labels generate --checkpoint` takes


@dataclass
class TrainState:
    """Where training stands: epoch being trained, optimiser updates done, data consumed in this epoch."""

    epoch: int = 0
    global_update: int = 0
    data_position: dict = field(default_factory=dict)  # {"steps": n, "ranks": [each rank's loader.position()]}

# Settings a resume must not change: they fix which samples an update sees, or the network itself.
RESUME_FIXED = ("model.name", "model.num_classes", "model.img_size", "data.batch_size", "data.seed",
                "data.shuffle_buffer", "data.view_choice", "data.drop_last", "optim.accumulation_steps")


def rng_state() -> dict:
    """Every RNG a training step touches, as weights_only-loadable values (numpy's key becomes a tensor)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Inverse of `rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A crash or SIGKILL mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_dict(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    ema: torch.nn.Module | None, scaler: torch.amp.GradScaler | None, state: TrainState,
                    config: Mapping, arch: str, metrics: Mapping | None = None, data: Mapping | None = None,
                    world_size: int = 1) -> dict:
    """The full training checkpoint (model must be unwrapped: no DDP `module.` prefix). Its tensors are the
    live ones: hand it to `trainer.checkpoint_writer.CheckpointWriter` (which copies it), or `atomic_save` it now.

    `data`: what identifies the training data ({"shards": names, "num_samples": n}), checked on resume.
    """
    return {
        "arch": arch,
        "data": dict(data or {}),
        "world_size": int(world_size),
        "state_dict": model.state_dict(),
        "state_dict_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": state.epoch,
        "global_update": state.global_update,
        "data_position": dict(state.data_position),
        "config": dict(config),
        "rng": rng_state(),
        "metrics": dict(metrics or {}),
    }


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a training checkpoint (a `checkpoint_dict` the loop wrote) with weights_only: no pickled code runs."""
    path = Path(path)
    if not path.is_file():
        raise TrainCheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise TrainCheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch", "global_update", "config") if k not in ckpt]
    if missing:
        raise TrainCheckpointError(f"checkpoint {path} is not a training checkpoint (missing {missing}); "
                              f"to start from weights only, load them into the model instead")
    return ckpt


def _setting(config: Mapping, dotted: str):
    section, key = dotted.split(".")
    return (config.get(section) or {}).get(key)


def _short(values) -> str:
    values = list(values)
    return ", ".join(map(str, values[:3])) + (f" … ({len(values)} in all)" if len(values) > 3 else "")


def resume_mismatches(ckpt: Mapping, *, arch: str, config: Mapping, data: Mapping | None = None,
                      world_size: int = 1) -> list[str]:
    """What differs between a checkpoint and the run resuming from it (empty: it fits). Pure."""
    out = []
    if ckpt.get("arch") is not None and ckpt["arch"] != arch:
        out.append(f"model {ckpt['arch']!r} → {arch!r}")
    for dotted in RESUME_FIXED:
        if dotted == "model.name":
            continue  # the arch above
        old, new = _setting(ckpt["config"], dotted), _setting(config, dotted)
        if old is not None and old != new:
            out.append(f"{dotted} {old!r} → {new!r}")
    old_data = ckpt.get("data") or {}
    if data and old_data.get("shards") is not None and list(old_data["shards"]) != list(data["shards"]):
        gone = [s for s in old_data["shards"] if s not in set(data["shards"])]
        new = [s for s in data["shards"] if s not in set(old_data["shards"])]
        out.append(f"shards {len(old_data['shards'])} → {len(data['shards'])}"
                   + (f" (missing: {_short(gone)})" if gone else "") + (f" (new: {_short(new)})" if new else "")
                   + ("" if gone or new else " (same names, other order)"))
    elif data and old_data.get("num_samples") is not None and old_data["num_samples"] != data.get("num_samples"):
        out.append(f"samples {old_data['num_samples']} → {data.get('num_samples')}")
    mid_epoch = bool((ckpt.get("data_position") or {}).get("ranks"))
    if mid_epoch and int(ckpt.get("world_size", len(ckpt["data_position"]["ranks"]))) != world_size:
        out.append(f"processes {ckpt.get('world_size', len(ckpt['data_position']['ranks']))} → {world_size} "
                   f"(written mid-epoch: the same number of ranks is needed)")
    return out


def check_resume_fits(ckpt: Mapping, *, arch: str, config: Mapping, data: Mapping | None = None,
                      world_size: int = 1, source: str = "") -> None:
    """Refuse, in one line, a resume whose model, data, batch size or world differs from the checkpoint's."""
    diff = resume_mismatches(ckpt, arch=arch, config=config, data=data, world_size=world_size)
    if diff:
        raise TrainCheckpointError(f"--resume {source}: the checkpoint does not fit this run ({'; '.join(diff)}); "
                                   f"resume with the checkpoint's settings and data, or start a new run in another --out")


def restore_checkpoint(ckpt: Mapping, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                       ema: torch.nn.Module | None, scaler: torch.amp.GradScaler | None, source: str = "") -> TrainState:
    """Load every part of a training checkpoint back into live objects; returns where to continue."""
    try:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if ckpt.get("state_dict_ema") is None:
                raise TrainCheckpointError(f"checkpoint {source} has no EMA weights but this run uses EMA")
            ema.module.load_state_dict(ckpt["state_dict_ema"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, ValueError) as e:
        if isinstance(e, TrainCheckpointError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainCheckpointError(f"checkpoint {source} does not fit this model/run: {first[:300]}") from None
    set_rng_state(ckpt["rng"])
    return TrainState(epoch=int(ckpt["epoch"]), global_update=int(ckpt["global_update"]),
                      data_position=dict(ckpt.get("data_position") or {}))


def export_for_labeling(checkpoint: str | Path, out: str | Path) -> Path:
    """Slim timm-style dict {arch, state_dict, state_dict_ema, epoch} for `stl-labels generate --checkpoint`."""
    ckpt = load_checkpoint_file(checkpoint)
    out = Path(out)
    atomic_save({"arch": ckpt.get("arch"), "state_dict": ckpt["state_dict"],
                 "state_dict_ema": ckpt.get("state_dict_ema") or ckpt["state_dict"], "epoch": ckpt["epoch"]}, out)
    return out


class StopRequest:
    """Turns SIGTERM (what schedulers send before killing a job) into a flag the loop checks between steps.

    The loop then writes a checkpoint and returns; handling it in the signal handler itself could write
    while a step is half done.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def __enter__(self) -> "StopRequest":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: signals cannot be caught there; nothing to install
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
