"""The student data path as plain generator steps (each one testable on a Python list).

    shard urls ─► track_shards ─► tar samples ─► enter_samples ─► lookup_rows ─► join_labels
        ─► (shuffle) ─► replay_views ─► augment_views ─► batch_samples(collate_student)        (CPU path)
        ─► (shuffle) ─► decode_views ─► attach_photometric ─► batch_samples(collate_sources)     (device path)

The CPU path renders the stored view (Pillow) and applies the photometric ops (timm's Pillow ops) in
the workers. The device path stops at the decoded image, cut to the part its stored view reads (the
crop box's footprint, with its origin); the collate packs the batch's regions back to back, unpadded,
straight into shared memory (`labeler.flat_images.pack_flat`), so the DataLoader hands them over
without another copy, and the training device renders the views and applies the drawn photometric
slots (`trainer.target_builder`, `trainer.photometric_torch`): bit-identical to rendering the whole
image (docs/design.md, "The train-time data path").

A sample is a dict: the tar fields plus `__url__`/`__key__` from webdataset, then `__pos__` (the
shard's index in this epoch's shard order), `__row__`, `label`, `view`, `params`, `token_*`, and
finally `image` (the rendered view, HWC uint8). Skips always go through the ledger with a reason.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from labeler.flat_images import pack_flat
from labeler.render_batch import source_footprint
from labeler.jpeg_decode import decode_rgb
from labelstore import ImageDecodeError, StoreError, decode_image, render
from labelstore.shard_format import IMAGE_EXTS, image_field, parse_label
from trainer.epoch_ledger import EpochLedger
from trainer.errors import TrainDataError
from trainer.student_augment import StudentAugment, sample_seed
from trainer.view_choice import choose_view

_KEPT = ("label", "view", "params", "token_logit", "token_class", "token_tail")  # what replay_views passes on


def track_shards(items: Iterable[dict], ledger: EpochLedger) -> Iterator[dict]:
    """Shard items {url, __pos__}: a shard is closed when the next one is asked for (tars are read lazily)."""
    for item in items:
        ledger.opened(item["__pos__"], item["url"])
        yield item
        ledger.closed(item["__pos__"])


def enter_samples(samples: Iterable[dict], ledger: EpochLedger, positions: dict[str, int],
                  expected_keys: Callable[[str], Iterable[str]] | None = None) -> Iterator[dict]:
    """Count samples into the ledger and tag them with `__pos__`.

    When a shard is over, the keys the store expects but the tar never delivered (a truncated or
    unreadable shard ends silently in webdataset) are recorded as skipped, so nothing goes missing
    unnoticed; then the shard is finished in the ledger.
    """
    def finish(before: int | None = None) -> None:
        for pos, url in ledger.closed_unfinished(before):
            if expected_keys is not None:
                seen = ledger.seen_keys.get(pos, set())
                for key in expected_keys(url):
                    if key not in seen:
                        ledger.skip(pos, url, key, "missing from the tar stream (truncated or unreadable shard)",
                                    entered=False)
            ledger.finished(pos)

    current = None
    for s in samples:
        pos = positions[s["__url__"]]
        if pos != current:
            finish(before=pos)
            current = pos
        ledger.entered(pos, s["__key__"])
        yield {**s, "__pos__": pos}
    finish()


def lookup_rows(samples: Iterable[dict], index, ledger: EpochLedger) -> Iterator[dict]:
    """Attach `__row__` (joined by key inside the shard's row range) and `label`; skip rows marked invalid
    and samples without a class label (recorded)."""
    for s in samples:
        rows = index.shard_rows(s["__url__"])
        row = rows.row(s["__key__"])  # MissingRow names shard and key: the shards differ from the labelled ones
        if not rows.is_valid(row):
            ledger.skip(s["__pos__"], s["__url__"], s["__key__"], "marked invalid in the label store")
            continue
        label = rows.label(row)
        if label < 0:
            label, _ = parse_label(s, s["__key__"])
        if label < 0:
            ledger.skip(s["__pos__"], s["__url__"], s["__key__"], "no class label (neither in the store nor the tar)")
            continue
        yield {**s, "__row__": row, "__shard__": rows.shard_index, "label": label}


class LabelJoin:
    """Reads stored view params + encoded token logits for a row, one store chunk (rows × one view) at a time.

    Rows of a shard arrive in order, so caching the last chunk read means each chunk is read once
    per epoch and all of it is used (docs/design.md: view choice per row-chunk).
    """

    def __init__(self, labeler_store, rows_per_chunk: int, num_rows: int, num_views: int,
                 run_seed: int, epoch: int, view_choice: str = "chunk"):
        self.reader, self.rows_per_chunk, self.num_rows = labeler_store, int(rows_per_chunk), int(num_rows)
        self.num_views, self.run_seed, self.epoch, self.view_choice = int(num_views), run_seed, epoch, view_choice
        self._chunk: tuple[int, int, dict] | None = None

    def view_of_chunk(self, chunk: int) -> int:
        return 0 if self.view_choice == "first" else choose_view(self.run_seed, self.epoch, chunk, self.num_views)

    def _read(self, start: int, stop: int, view: int, shard: str) -> dict:
        """One chunk read; a damaged chunk (zarr: checksum/decompression errors) becomes one line naming it."""
        try:
            return self.reader.read(slice(start, stop), view)
        except StoreError:
            raise  # labelstore names array, shard and rows itself
        except (ValueError, RuntimeError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise TrainDataError(f"labeler {getattr(self.reader, 'name', '')!r}: stored labels (params/tokens/cls, "
                                 f"view {view}) of rows {start}..{stop - 1}, shard {shard!r}, cannot be read "
                                 f"({first}); run `stl-labels verify` on the store") from None

    def __call__(self, row: int, shard_first: int, shard_stop: int, shard: str = "") -> dict:
        """The chosen view's data for `row`; reads the rows of its chunk that belong to its shard."""
        chunk = row // self.rows_per_chunk
        if self._chunk is None or self._chunk[0] != chunk:
            start = max(chunk * self.rows_per_chunk, shard_first)
            stop = min((chunk + 1) * self.rows_per_chunk, shard_stop, self.num_rows)  # no padding rows
            view = self.view_of_chunk(chunk)
            self._chunk = (chunk, start, {"view": view, **self._read(start, stop, view, shard)})
        _, start, data = self._chunk
        i = row - start
        tokens = data["tokens"]
        out = {"view": data["view"], "params": np.asarray(data["params"][i]),
               "token_logit": np.asarray(tokens.logit[i])}
        if tokens.cls is not None:
            out["token_class"] = np.asarray(tokens.cls[i])
            out["token_tail"] = np.asarray(tokens.tail_lse[i])
        return out


def join_labels(samples: Iterable[dict], join: LabelJoin, index) -> Iterator[dict]:
    """Attach the chunk's view index, the stored view params and the encoded token logits."""
    for s in samples:
        rows = index.shard_rows(s["__url__"])
        yield {**s, **join(s["__row__"], rows.first_row, rows.stop, rows.url)}


def _decoded(samples: Iterable[dict], ledger: EpochLedger, check, decode: Callable) -> Iterator[tuple[dict, object]]:
    """(sample without its encoded fields, decoded RGB image): labelstore's one decode path, as `decode` gives it
    (`labelstore.decode_image`: a Pillow image; `labeler.jpeg_decode.decode_rgb`: the same pixels as an array,
    faster for large JPEGs).

    A corrupt or missing image is skipped and recorded, not a crash; so is one that differs from the image
    labelled (`check`: a `trainer.source_check.SourceCheck`).
    """
    for s in samples:
        ext = image_field(s)
        if ext is None:
            ledger.skip(s["__pos__"], s["__url__"], s["__key__"], f"no image field ({'/'.join(IMAGE_EXTS)})")
            continue
        try:
            img = decode(s[ext], name=f"{s['__url__']}:{s['__key__']}.{ext}")
        except ImageDecodeError as e:
            ledger.skip(s["__pos__"], s["__url__"], s["__key__"], str(e))
            continue
        hw = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[:2]
        reason = check(s, s[ext], hw) if check is not None else None
        if reason is not None:
            ledger.skip(s["__pos__"], s["__url__"], s["__key__"], reason)
            continue
        yield {k: v for k, v in s.items() if k.startswith("__") or k in _KEPT}, img


def replay_views(samples: Iterable[dict], spec, ledger: EpochLedger, check=None) -> Iterator[dict]:
    """CPU path: decode and render the STORED view params (never re-sampled); the encoded fields are dropped.
    Decoded by Pillow, which renders from its own image (an array in between would only cost a conversion)."""
    for out, img in _decoded(samples, ledger, check, decode_image):
        out["image"] = render(img, out["params"], spec)
        yield out


def decode_views(samples: Iterable[dict], ledger: EpochLedger, check) -> Iterator[dict]:
    """Device path: decode only (the device renders later). `image` is only the part of the decoded source that
    the sample's stored view reads (its crop box and a margin: `labeler.render_batch.source_footprint`, about
    half the pixels on average), with `origin` (y0, x0) in the source and `image_hw` the source's size."""
    for out, img in _decoded(samples, ledger, check, decode_rgb):
        hw = img.shape[:2]
        y0, x0, y1, x1 = (int(v) for v in source_footprint(out["params"], hw)[0])
        out["image"] = np.ascontiguousarray(img[y0:y1, x0:x1])  # a copy, so the whole decoded image is freed here
        out["origin"], out["image_hw"] = (y0, x0), hw
        yield out


def attach_photometric(samples: Iterable[dict], aug: StudentAugment | None, run_seed: int,
                     epoch: int) -> Iterator[dict]:
    """Device path: attach the sample's `photo_ops` / `photo_args` (the photometric slots of its view's
    RandAugment draw, trainer/photometric.py), seeded per (run seed, epoch, row) as `augment_views` is."""
    for s in samples:
        if aug is not None:
            ops, args = aug.draw(s["params"], sample_seed(run_seed, epoch, s["__row__"]))
            s = {**s, "photo_ops": ops, "photo_args": args}
        yield s



def augment_views(samples: Iterable[dict], aug: StudentAugment | None, run_seed: int, epoch: int) -> Iterator[dict]:
    """The photometric slots of each sample's stored RandAugment draw, seeded per (run seed, epoch, row);
    `aug=None` passes through."""
    for s in samples:
        if aug is not None:
            img = aug(Image.fromarray(s["image"]), s["params"], sample_seed(run_seed, epoch, s["__row__"]))
            s = {**s, "image": np.asarray(img)}
        yield s


def collate_student(samples: list[dict]) -> dict:
    """Stack a list of samples into tensors; images stay uint8 and NHWC in memory (= channels_last NCHW)."""
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2)
    return {"image": images, **_collate_labels(samples)}


def _collate_labels(samples: list[dict]) -> dict:
    batch = {
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "row": torch.tensor([s["__row__"] for s in samples], dtype=torch.int64),
        "view": torch.tensor([s["view"] for s in samples], dtype=torch.int64),
        "token_logit": torch.from_numpy(np.stack([s["token_logit"] for s in samples])),
    }
    if "token_class" in samples[0]:
        batch["token_class"] = torch.from_numpy(np.stack([s["token_class"] for s in samples]))
        batch["token_tail"] = torch.from_numpy(np.stack([s["token_tail"] for s in samples]))
    return batch


def collate_sources(samples: list[dict]) -> dict:
    """Device path: the decoded footprint regions as one `labeler.flat_images.FlatImages` (`source`: the regions'
    own bytes, no padding; in shared memory inside a DataLoader worker, so handing it over copies nothing), where
    each lies in its source (`source_origin` (N, 2) (y0, x0)) and the source's size (`source_hw` (N, 2)), the
    stored view `params` (N, P) and the photometric slots, plus what `collate_student` gives minus `image`."""
    in_worker = get_worker_info() is not None
    flat = pack_flat([s["image"] for s in samples], shared=in_worker)
    batch = _collate_labels(samples)
    batch.update(source=flat,
                 source_origin=torch.tensor([s["origin"] for s in samples], dtype=torch.int64),
                 source_hw=torch.tensor([s["image_hw"] for s in samples], dtype=torch.int64),
                 params=torch.from_numpy(np.stack([np.asarray(s["params"], np.float32) for s in samples])))
    if "photo_ops" in samples[0]:
        batch["photo_ops"] = torch.from_numpy(np.stack([s["photo_ops"] for s in samples]))
        batch["photo_args"] = torch.from_numpy(np.stack([s["photo_args"] for s in samples]))
    return batch


def batch_samples(samples: Iterable[dict], batch_size: int, ledger: EpochLedger, collate: Callable[[list], dict],
                  drop_last: bool = False) -> Iterator[dict]:
    """Batches with a `meta` entry (shards newly done, samples newly skipped); always ends with a
    meta-only item so the last shard's completion and the last skips reach the main process."""
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            for b in buf:
                ledger.left(b["__pos__"])
            yield {**collate(buf), "meta": ledger.drain()}
            buf = []
    if buf and drop_last:
        for b in buf:
            ledger.skip(b["__pos__"], b["__url__"], b["__key__"], "dropped with the last partial batch (drop_last)")
    elif buf:
        for b in buf:
            ledger.left(b["__pos__"])
        yield {**collate(buf), "meta": ledger.drain()}
    yield {"meta": ledger.drain()}
