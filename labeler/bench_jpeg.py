"""`stl-labels bench jpeg`: how far nvJPEG decode (`decode_device: cuda`) is from the Pillow decode.

The trainer replays views from the Pillow decode (`labelstore.decode_image`), so a labeler that
decodes on the GPU labels slightly different pixels. This prints the pixel difference of the two
decodes (mean / max |Δ|, share of differing values) and how often the teacher's top-1 agrees on the
same views rendered from each (class head and every token), so the option can be judged on data.
Runs on CPU too (torchvision's CPU decoder), which checks the code path, not nvJPEG.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labeler.device import resolve_device
from labeler.flat_images import pack_flat, upload_flat
from labeler.jpeg_decode import plain_jpeg_hw
from labeler.render_batch import render_batch
from labeler.teacher_spec import build_labeler_spec
from labeler.work_unit import build_teacher
from labeler.worker_settings import WorkerSettings
from labelstore import decode_image, draw_views
from labelstore.shard_format import expand_shard_urls, iter_shard


@dataclass(frozen=True)
class JpegReport:
    device: str
    images: int
    skipped: int  # not baseline RGB/grey JPEGs: both paths use Pillow for them
    mean_abs: float
    max_abs: int
    differing: float  # share of pixel values that differ
    cls_top1_agree: float
    token_top1_agree: float

    def format(self) -> str:
        return "\n".join([
            f"device {self.device}: {self.images} JPEGs compared ({self.skipped} other images skipped)",
            f"pixels  mean |Δ| {self.mean_abs:.4f}  max |Δ| {self.max_abs}  differing values {100 * self.differing:.2f} %",
            f"teacher top-1 agreement  class {100 * self.cls_top1_agree:.2f} %  tokens {100 * self.token_top1_agree:.2f} %",
        ])


def bench_jpeg(shards: list[str], model: str, num_classes: int | None = None, checkpoint: str | None = None,
               views: int = 4, limit: int = 512, batch_images: int = 32, device: str = "auto",
               amp: str = "bf16") -> JpegReport:
    from torchvision.io import ImageReadMode, decode_jpeg

    dev = resolve_device(device)
    spec = build_labeler_spec(name="jpeg", model=model, num_classes=num_classes, views=views, topk=1,
                              checkpoint=checkpoint)
    teacher = build_teacher(spec, WorkerSettings(checkpoint=checkpoint, amp=amp, compile=False, cuda_graph=False), dev)
    abs_sum, count, max_abs, differing, skipped = 0.0, 0, 0, 0, 0
    agree_cls, agree_tok, n_cls, n_tok = 0, 0, 0, 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal agree_cls, agree_tok, n_cls, n_tok
        index = np.repeat(np.arange(len(pending)), views)
        params = np.concatenate([draw_views(spec.view_spec, 0, i, views, a.shape[:2]) for i, (a, _) in enumerate(pending)])
        outs = []
        for k in range(2):
            src = upload_flat(pack_flat([p[k] for p in pending], pin_memory=dev.type == "cuda"), dev)
            # Eager render: this bench compares decoders, a compile would only add its start-up time.
            outs.append(teacher.forward(render_batch(src, index, params, spec.view_spec, compiled=False)))
        agree_cls += int((outs[0][0].argmax(-1) == outs[1][0].argmax(-1)).sum())
        agree_tok += int((outs[0][1].argmax(-1) == outs[1][1].argmax(-1)).sum())
        n_cls, n_tok = n_cls + outs[0][0].shape[0], n_tok + outs[0][1].shape[0] * outs[0][1].shape[1]
        pending.clear()

    seen = 0
    for url in expand_shard_urls(shards):
        for sample in iter_shard(url):
            if seen >= limit:
                break
            if sample.error is not None or plain_jpeg_hw(sample.image) is None:
                skipped += 1
                continue
            ref = np.asarray(decode_image(sample.image, sample.image_name))
            data = torch.frombuffer(bytearray(sample.image), dtype=torch.uint8)
            got = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev).permute(1, 2, 0).cpu().numpy()
            d = np.abs(got.astype(np.int16) - ref)
            abs_sum, count = abs_sum + float(d.sum()), count + d.size
            max_abs, differing = max(max_abs, int(d.max())), differing + int((d > 0).sum())
            pending.append((ref, np.ascontiguousarray(got)))
            seen += 1
            if len(pending) == batch_images:
                flush()
    if pending:
        flush()
    if not seen:
        raise ValueError(f"bench jpeg: no baseline RGB/grey JPEGs in {shards}")
    name = str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev)
    return JpegReport(name, seen, skipped, abs_sum / count, max_abs, differing / count, agree_cls / n_cls, agree_tok / n_tok)
