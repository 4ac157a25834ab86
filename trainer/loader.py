"""Streaming loaders over WebDataset shards: the student (stored views + token labels), the stage-1
labeler (timm's full train transform, no store) and evaluation (resize + centre crop). Each is a
`trainer.shard_stream.ShardStream` (shard order, sharding over ranks × workers, exact resume position, skip
counting, persistent workers) with its own per-worker pipeline.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
import webdataset as wds
from timm.data import create_transform

from labelstore import ImageDecodeError, LabelStore, RowIndex, SchemaMismatch, decode_image
from labelstore.shard_format import expand_shard_urls, image_field, parse_label
from trainer.data_config import DataConfig
from trainer.epoch_ledger import EpochLedger, skip_consumed
from trainer.shard_stream import ShardStream, StreamLoader
from trainer.source_check import SourceCheck
from trainer.stages import (
    LabelJoin, augment_views, batch_samples, collate_sources, collate_student, decode_views,
    attach_photometric, enter_samples, join_labels, lookup_rows, replay_views,
)
from trainer.student_augment import StudentAugment, keep_posterize_bits_positive, sample_seed, seeded_global_random

_SHUFFLE_TAG = 0x5348_5546  # "SHUF"


# --- student: stored views + token labels -----------------------------------------------------------

class StudentPipeline:
    """The student data-path steps for one worker's samples (picklable: the store opens lazily)."""

    def __init__(self, cfg: DataConfig, index: RowIndex, labeler_store, view_spec, rows_per_chunk: int,
                 num_rows: int, num_views: int, render_on_device: bool = False):
        self.cfg, self.index, self.labeler_store, self.view_spec = cfg, index, labeler_store, view_spec
        self.rows_per_chunk, self.num_rows, self.num_views = rows_per_chunk, num_rows, num_views
        self.render_on_device = bool(render_on_device)
        self.aug = (StudentAugment(cfg.rand_augment, view_spec)
                    if cfg.student_augs and cfg.rand_augment else None)

    def __call__(self, samples, ledger: EpochLedger, positions: dict, epoch: int, stream_id: tuple[int, int]):
        cfg = self.cfg
        s = enter_samples(samples, ledger, positions, expected_keys=lambda url: self.index.shard_rows(url).keys)
        s = lookup_rows(s, self.index, ledger)
        join = LabelJoin(self.labeler_store, self.rows_per_chunk, self.num_rows, self.num_views,
                         cfg.seed, epoch, cfg.view_choice)
        s = join_labels(s, join, self.index)
        if cfg.shuffle_buffer > 0:
            seed = np.random.SeedSequence(cfg.seed, spawn_key=(_SHUFFLE_TAG, epoch, *stream_id)).generate_state(1)[0]
            s = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, seed=int(seed))(s)
        s = skip_consumed(s, ledger)  # exact resume: the order is fixed from here on
        check = SourceCheck(self.index)
        if self.render_on_device:  # the device renders and augments (trainer.target_builder)
            s = attach_photometric(decode_views(s, ledger, check), self.aug, cfg.seed, epoch)
            return batch_samples(s, cfg.batch_size, ledger, collate_sources, cfg.drop_last)
        s = replay_views(s, self.view_spec, ledger, check)
        s = augment_views(s, self.aug, cfg.seed, epoch)
        return batch_samples(s, cfg.batch_size, ledger, collate_student, cfg.drop_last)


class StudentLoader(StreamLoader):
    """Batches: image uint8 (B,3,H,W) channels_last, label, row, view, token_logit (B,T,K|C) f16,
    token_class (B,T,K) int, token_tail (B,T) f16 (the last two absent for a dense store).
    Device path: `source` (a `labeler.flat_images.FlatImages` of the part of each decoded image its view reads)
    + `source_origin` (B,2) + `source_hw` (B,2) + `params` (B,P) + `photo_ops` /
    `photo_args` (B,S) instead of `image` (rendered by `trainer.target_builder.TargetBuilder`)."""

    def __init__(self, stream: ShardStream, *, workers: int, pin_memory: bool, labeler_spec, num_samples: int,
                 prefetch_factor: int = 4, overlap_epochs: bool = True):
        # num_samples: the labelled (valid) rows of the given shards, one epoch over all ranks
        super().__init__(stream, workers=workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                         overlap_epochs=overlap_epochs, num_samples=num_samples)
        self.labeler_spec = labeler_spec

    @property
    def store_grid(self) -> tuple[int, int]:
        return tuple(self.labeler_spec.grid)

    @property
    def num_classes(self) -> int:
        return int(self.labeler_spec.num_classes)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.labeler_spec.view_spec.size)

    @property
    def view_spec(self):
        return self.labeler_spec.view_spec

    @property
    def render_on_device(self) -> bool:
        return self.stream.pipeline.render_on_device

    def view_choices(self, epoch: int) -> dict:
        """The epoch's view per store chunk of the streamed shards (deterministic; for the run log)."""
        pipe = self.stream.pipeline
        rpc, shards = pipe.rows_per_chunk, pipe.index.store.shards
        used = set(pipe.index.shard_of_url.values())
        chunks = sorted({c for s in shards if s.index in used
                         for c in range(s.first_row // rpc, (s.stop - 1) // rpc + 1) if s.num_samples})
        join = LabelJoin(None, rpc, pipe.num_rows, pipe.num_views, pipe.cfg.seed, epoch, pipe.cfg.view_choice)
        return {"epoch": int(epoch), "seed": pipe.cfg.seed, "rows_per_chunk": rpc, "view_choice": pipe.cfg.view_choice,
                "views": {int(c): join.view_of_chunk(c) for c in chunks}}


def token_chunk_rows(labeler_store) -> int:
    """Rows of one read chunk (one view) of the token array: the unit of the view choice (docs/design.md)."""
    path = "tokens/logits" if labeler_store.spec.dense else "tokens/topk_logit"
    return int(labeler_store.array(path).chunks[0])


def open_labels(labels, labeler: str, *, num_classes: int | None = None, input_size=None):
    """Open a store read-only and check it can label this run (labelstore's compatibility check):
    labeler present, the student's classes and view size."""
    store = labels if isinstance(labels, LabelStore) else LabelStore.open(str(labels), mode="r")
    expect = {"num_classes": num_classes, "input_size": input_size}  # input_size: the student must see the teacher's views
    return store, store.labeler(labeler, expect={k: v for k, v in expect.items() if v is not None} or None)


def build_student_loader(cfg: DataConfig, *, labels, labeler: str, num_classes: int | None = None,
                         rank: int | None = None, world_size: int | None = None,
                         pin_memory: bool = False, render_on_device: bool = False) -> StudentLoader:
    """The stage-2 loader: stream `cfg.shards`, join each sample to its stored row, replay the stored view
    (in the workers, or on the training device with `render_on_device`: see `cfg.augment_on_device`).

    Raises SchemaMismatch (clear message) for a missing labeler, another class count, another view
    size, shards that are not in the store, or shards the labeler has not finished.
    """
    urls = expand_shard_urls(cfg.shards)
    store, lab = open_labels(labels, labeler, num_classes=num_classes, input_size=cfg.input_size)
    index = store.row_index(urls)
    done = np.asarray(lab.done_mask(), dtype=bool)
    unfinished = [u for u in urls if not done[index.shard_of_url[u]]]
    if unfinished:
        raise SchemaMismatch(f"labeler {labeler!r} has no labels yet for {len(unfinished)} shard(s), e.g. "
                             f"{unfinished[0]!r}: finish `stl-labels generate` first")
    valid = np.asarray(store.samples["valid"][:], dtype=bool)
    num_samples = sum(int(valid[s.first_row:s.first_row + s.num_samples].sum())
                      for i, s in enumerate(store.shards) if i in set(index.shard_of_url.values()))
    spec = lab.spec
    pipeline = StudentPipeline(cfg, index, lab, spec.view_spec, token_chunk_rows(lab), store.num_rows,
                               int(spec.views), render_on_device=render_on_device)
    stream = ShardStream(urls, pipeline, seed=cfg.seed, rank=rank, world_size=world_size)
    return StudentLoader(stream, workers=cfg.workers, pin_memory=pin_memory, labeler_spec=spec,
                         num_samples=num_samples, prefetch_factor=cfg.prefetch_factor,
                         overlap_epochs=cfg.overlap_epochs)


# --- stage 1 (labeler training) and evaluation: timm transforms, no store ------------------------------

def decode_and_transform(samples, ledger: EpochLedger, transform, run_seed: int, epoch: int):
    """Decode (labelstore's decode path) and apply a timm transform, seeded per (seed, epoch, shard, key)."""
    for s in samples:
        ext = image_field(s)
        label, _ = parse_label(s, s["__key__"])
        reason = None if ext is not None else "no image field"
        if reason is None and label < 0:
            reason = "no class label (cls/json field)"
        if reason is None:
            try:
                img = decode_image(s[ext], name=f"{s['__url__']}:{s['__key__']}.{ext}")
            except ImageDecodeError as e:
                reason = str(e)
        if reason is not None:
            ledger.skip(s["__pos__"], s["__url__"], s["__key__"], reason)
            continue
        with seeded_global_random(sample_seed(run_seed, epoch, s["__pos__"], zlib.crc32(s["__key__"].encode())),
                                  torch_cpu=True):
            image = transform(img)
        yield {"__url__": s["__url__"], "__key__": s["__key__"], "__pos__": s["__pos__"], "image": image,
               "label": label}


def collate_plain(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "key": [s["__key__"] for s in samples]}


class TransformPipeline:
    def __init__(self, cfg: DataConfig, transform, drop_last: bool, shuffle_buffer: int):
        self.cfg, self.transform, self.drop_last, self.shuffle_buffer = cfg, transform, drop_last, shuffle_buffer

    def __call__(self, samples, ledger, positions, epoch, stream_id):
        s = enter_samples(samples, ledger, positions)
        if self.shuffle_buffer > 0:
            seed = np.random.SeedSequence(self.cfg.seed, spawn_key=(_SHUFFLE_TAG, epoch, *stream_id)).generate_state(1)[0]
            s = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=int(seed))(s)
        s = skip_consumed(s, ledger)  # exact resume: the order is fixed from here on
        s = decode_and_transform(s, ledger, self.transform, self.cfg.seed, epoch)
        return batch_samples(s, self.cfg.batch_size, ledger, collate_plain, self.drop_last)


def build_labeler_loader(cfg: DataConfig, *, rank: int | None = None, world_size: int | None = None,
                         pin_memory: bool = False, num_samples: int | None = None) -> StreamLoader:
    """Stage 1: timm's standard full-augmentation train transform (random-resized crop, flip, RandAugment
    with its geometric ops); erasing and mixup/cutmix happen on the device (TargetBuilder), as timm's
    prefetcher does. Batches: image uint8 (B,3,H,W), label, key."""
    size = cfg.input_size or (224, 224)
    transform = keep_posterize_bits_positive(create_transform(
        size, is_training=True, auto_augment=cfg.rand_augment or None, interpolation="bicubic",
        mean=cfg.mean, std=cfg.std, re_prob=0.0, use_prefetcher=True))
    stream = ShardStream(expand_shard_urls(cfg.shards), TransformPipeline(cfg, transform, cfg.drop_last, cfg.shuffle_buffer),
                         seed=cfg.seed, rank=rank, world_size=world_size)
    return StreamLoader(stream, workers=cfg.workers, pin_memory=pin_memory, prefetch_factor=cfg.prefetch_factor,
                        overlap_epochs=cfg.overlap_epochs, num_samples=num_samples)


def build_eval_loader(cfg: DataConfig, shards=None, *, rank: int | None = None, world_size: int | None = None,
                      pin_memory: bool = False) -> StreamLoader:
    """Evaluation: resize to size / crop_pct (bicubic) + centre crop, shards in order, nothing dropped."""
    size = cfg.input_size or (224, 224)
    transform = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=cfg.crop_pct,
                                 mean=cfg.mean, std=cfg.std, use_prefetcher=True)
    stream = ShardStream(expand_shard_urls(shards if shards is not None else cfg.shards),
                         TransformPipeline(cfg, transform, drop_last=False, shuffle_buffer=0),
                         seed=cfg.seed, shuffle_shards=False, rank=rank, world_size=world_size)
    return StreamLoader(stream, workers=cfg.workers, pin_memory=pin_memory, overlap_epochs=False)  # one pass
