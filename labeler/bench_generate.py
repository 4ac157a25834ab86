"""`stl-labels bench generate`: the labeling pipeline's views/s against the bare teacher forward.

Both are measured in one process on the same device, batch size and precision: first the whole work
unit (read tar → decode → render S views → forward → top-k → write) over the given shards into a
scratch store, then the teacher's forward alone on random uint8 views of the same shape. Also prints
the busy seconds of each phase. Decode and render run on prefetch threads, overlapped with the
forward, so the phase shares can add up to more than 100 % of the wall time. Nothing is asserted.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from labeler.device import resolve_device
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.work_unit import PHASES, ShardLabeler, WorkerSettings
from labelstore.shard_format import count_samples, expand_shard_urls


@dataclass(frozen=True)
class BenchReport:
    device: str
    model: str
    batch_size: int
    amp: str
    views_per_sample: int
    pipeline_views: int
    pipeline_seconds: float
    forward_views: int
    forward_seconds: float
    phase_seconds: dict

    @property
    def pipeline_rate(self) -> float:
        return self.pipeline_views / self.pipeline_seconds

    @property
    def forward_rate(self) -> float:
        return self.forward_views / self.forward_seconds

    def format(self) -> str:
        lines = [
            f"device {self.device}, model {self.model}, batch {self.batch_size} views, amp {self.amp}, "
            f"{self.views_per_sample} views/sample",
            f"pipeline      {self.pipeline_rate:10.1f} views/s  ({self.pipeline_views} views in {self.pipeline_seconds:.2f} s)",
            f"bare forward  {self.forward_rate:10.1f} views/s  ({self.forward_views} views in {self.forward_seconds:.2f} s)",
            f"pipeline / bare forward = {self.pipeline_rate / self.forward_rate:.2f}",
            "phase busy seconds (% of pipeline wall time; decode/render overlap the forward):",
        ]
        for phase in PHASES:
            sec = self.phase_seconds.get(phase, 0.0)
            lines.append(f"  {phase:8s} {sec:8.2f} s  {100 * sec / self.pipeline_seconds:5.1f} %")
        return "\n".join(lines)


def bench_generate(shards: list[str], model: str, batch_size: int, amp: str, views: int, topk: int = 10,
                   num_classes: int = 1000, input_size: int | None = None, device: str = "auto",
                   render_backend: str = "auto", decode_threads: int = 2, checkpoint: str | None = None,
                   forward_batches: int | None = None) -> BenchReport:
    """Measure pipeline and bare forward; the teacher has random weights unless `checkpoint` is given."""
    urls = expand_shard_urls(shards)
    device = resolve_device(device)
    worker = WorkerSettings(checkpoint=checkpoint, batch_size=batch_size, amp=amp, device=device,
                            render_backend=render_backend, decode_threads=decode_threads)
    with tempfile.TemporaryDirectory(prefix="stl-bench-") as tmp:
        torch.manual_seed(0)
        spec = build_labeler_spec(name="bench", model=model, num_classes=num_classes, views=views, topk=topk,
                                  checkpoint=checkpoint, input_size=(input_size, input_size) if input_size else None)
        store, _ = open_labeler_store(f"{tmp}/bench.zarr", seed=0, rows_per_chunk=256, spec=spec)
        store.register_shards([(u, count_samples(u)) for u in urls])
        work = ShardLabeler(store.path, "bench", worker, sync_timing=True)
        teacher = work.teacher
        h, w = spec.input_size
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        warm = torch.randint(0, 256, (batch_size, h, w, 3), dtype=torch.uint8, device=device)
        teacher.encode(teacher.forward(warm)[1])  # warm-up (cudnn autotune, compile, allocator)
        sync()

        start = time.perf_counter()
        outcomes = [work(i) for i in range(len(urls))]
        pipeline_seconds = time.perf_counter() - start
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"bench: shard {failed[0].url} failed: {failed[0].error}")
        pipeline_views = sum(o.views for o in outcomes)
        phases = {p: sum(o.phase_seconds.get(p, 0.0) for o in outcomes) for p in PHASES}

        n_batches = forward_batches or max(3, round(pipeline_views / batch_size))
        sync()
        start = time.perf_counter()
        for _ in range(n_batches):
            teacher.forward(warm)
        sync()
        forward_seconds = time.perf_counter() - start
    return BenchReport(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                       model=model, batch_size=batch_size, amp=amp, views_per_sample=views,
                       pipeline_views=pipeline_views, pipeline_seconds=pipeline_seconds,
                       forward_views=n_batches * batch_size, forward_seconds=forward_seconds, phase_seconds=phases)
