"""One training run of either STL stage: build model, loader, targets and loss, then call `loop.train`.

- Stage 1 (`run_labeler`): the token-labeler learns from class labels only (paper Eq. 2) with timm's full
  train augmentation; its EMA export is what `stl-labels generate --checkpoint` loads.
- Stage 2 (`run_student`): the student replays the stored views and learns from the class target plus the
  stored token labels (paper Eq. 5).
Both run alone or under `torchrun` (one process per device).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from labeler.models import create_token_model, token_grid
from labelstore.shard_format import count_samples, expand_shard_urls
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, init_distributed, shutdown_distributed
from trainer.loader import build_labeler_loader, build_student_loader
from trainer.loop import TrainResult, train
from trainer.losses import labeler_loss, student_loss
from trainer.target_builder import TargetBuilder


def loader_epochs(loader, *, epochs: int | None = None, max_steps: int | None = None) -> Callable[[int, dict], object]:
    """Adapt a `trainer.loader` StreamLoader to the loop's `epoch_batches(epoch, position)`.

    A mid-epoch checkpoint holds every rank's `loader.position()`; each rank continues exactly from its
    own (same world size and data.workers required: the loop checks the world size, the loader the workers).

    The next epoch is started on the loader's second lane (`loader.prefetch_epoch`, with data.overlap_epochs)
    once this epoch has about as many batches left as the workers keep ready (workers × prefetch_factor;
    from the loader's estimate, capped at `max_steps`), or after its first batch when the length is unknown;
    never past `epochs`.
    """
    rank = loader.stream.rank or 0

    def prefetch_after(epoch: int) -> int | None:
        """Batches of `epoch` to read before starting the next one (None: do not start it)."""
        if not loader.overlap_epochs or (epochs is not None and epoch + 1 >= epochs):
            return None
        expected = loader.batches_per_epoch()
        if max_steps is not None:
            expected = max_steps if expected is None else min(expected, max_steps)
        ahead = loader.workers * loader.prefetch_factor
        return 1 if expected is None else max(1, expected - ahead)

    def epoch_batches(epoch: int, position: dict):
        ranks = position.get("ranks") or []
        loader.set_epoch(epoch, resume=ranks[rank] if ranks else None)
        # (Starting a DataLoader pass draws from the global torch RNG; the loader keeps that draw out of the
        # training RNG stream, so a resumed run draws the same drop-path masks: trainer/epoch_lanes.py.)
        start_next = prefetch_after(epoch)
        taken = int(position.get("steps", 0))
        # The position is built only when the loop reads it (checkpoints, logs), before it asks for the next batch.
        for batch in loader:
            taken += 1
            if start_next is not None and taken >= start_next:
                loader.prefetch_epoch(epoch + 1)
                start_next = None
            yield batch, loader.position
    return epoch_batches


def fixed_shapes(cfg: TrainConfig) -> TrainConfig:
    """model.compile wants one batch shape: drop each worker's last partial batch (data.drop_last)."""
    if cfg.model.compile and not cfg.data.drop_last:
        warnings.warn("model.compile: setting data.drop_last=true so every step has the same shape "
                      "(each data worker's last partial batch is dropped, counted as skipped)", stacklevel=2)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, drop_last=True))
    return cfg


def _epochs_of(loader, cfg: TrainConfig):
    return loader_epochs(loader, epochs=cfg.schedule.total_epochs, max_steps=cfg.schedule.max_steps_per_epoch)


def data_identity(urls, num_samples: int) -> dict:
    """What a checkpoint records of its data and `--resume` compares: shard names (not paths: shards may be
    mounted elsewhere) in the given order, and the sample count."""
    return {"shards": [os.path.basename(str(u).rstrip("/")) for u in urls], "num_samples": int(num_samples)}


def _prepare(cfg: TrainConfig, out_dir: str | Path) -> DistInfo:
    info = init_distributed(cfg.run.device)
    torch.manual_seed(cfg.data.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if info.is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(Path(out_dir) / "config.yaml")  # the resolved config this run used
    return info


def build_model(cfg: TrainConfig, input_size: tuple[int, int] | None = None):
    """The token model with the configured (or the paper's per-size) drop-path rate, built for `input_size`
    (the student: the store's view size) when its timm constructor takes an `img_size` (ViT-style position
    embeddings are sized by it); CNN-style models take any size and are built as they are."""
    kwargs = {"drop_path_rate": cfg.model.resolved_drop_path_rate}
    if input_size is None:
        return create_token_model(cfg.model.name, num_classes=cfg.model.num_classes, **kwargs)
    h, w = input_size
    try:
        return create_token_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=h if h == w else (h, w),
                                  **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return create_token_model(cfg.model.name, num_classes=cfg.model.num_classes, **kwargs)


def run_student(cfg: TrainConfig, *, labels: str | Path, labeler: str, out_dir: str | Path,
                resume: str | Path | None = None) -> TrainResult:
    """Stage 2, paper Eq. 5, on the token labels `labeler` stored in `labels`."""
    cfg = fixed_shapes(cfg)
    info = _prepare(cfg, out_dir)
    try:
        loader = build_student_loader(cfg.data, labels=labels, labeler=labeler, num_classes=cfg.model.num_classes,
                                      rank=info.rank, world_size=info.world_size,
                                      pin_memory=info.device.type == "cuda",
                                      render_on_device=cfg.data.augment_on_device(info.device))
        model = build_model(cfg, loader.input_size)
        targets = TargetBuilder(num_classes=cfg.model.num_classes, data=cfg.data, tokens=cfg.tokens,
                                store_grid=loader.store_grid, student_grid=token_grid(model, loader.input_size),
                                device=info.device, seed=cfg.data.seed, train=True, view_spec=loader.view_spec,
                                rank=info.rank)
        return train(model=model, arch=cfg.model.name, cfg=cfg, out_dir=out_dir, epoch_batches=_epochs_of(loader, cfg),
                     make_targets=lambda batch, device, step: targets(batch, step),
                     compute_loss=partial(student_loss, beta=cfg.tokens.beta),
                     steps_per_epoch=loader.batches_per_epoch(info.world_size), info=info, resume=resume,
                     data_identity=data_identity(loader.stream.urls, loader.num_samples))
    finally:
        shutdown_distributed(info)


def run_labeler(cfg: TrainConfig, *, out_dir: str | Path, resume: str | Path | None = None) -> TrainResult:
    """Stage 1, paper Eq. 2: class labels only, timm's full train augmentation (no label store)."""
    if cfg.data.input_size is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, input_size=(cfg.model.img_size,) * 2))
    cfg = fixed_shapes(cfg)
    info = _prepare(cfg, out_dir)
    try:
        # Stage 1 has no store whose sample table would tell the epoch length the schedule needs.
        num_samples = sum(count_samples(url) for url in expand_shard_urls(cfg.data.shards))
        loader = build_labeler_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                                      pin_memory=info.device.type == "cuda", num_samples=num_samples)
        model = build_model(cfg, cfg.data.input_size)
        targets = TargetBuilder(num_classes=cfg.model.num_classes, data=cfg.data, tokens=None, store_grid=None,
                                device=info.device, seed=cfg.data.seed, train=True, rank=info.rank)
        return train(model=model, arch=cfg.model.name, cfg=cfg, out_dir=out_dir, epoch_batches=_epochs_of(loader, cfg),
                     make_targets=lambda batch, device, step: targets(batch, step),
                     compute_loss=lambda c, t, y, _tokens: labeler_loss(c, t, y, alpha=cfg.loss.alpha),
                     steps_per_epoch=loader.batches_per_epoch(info.world_size), info=info, resume=resume,
                     data_identity=data_identity(loader.stream.urls, num_samples))
    finally:
        shutdown_distributed(info)
