"""labeler.bench_generate_report: which phases count as the device's compute, and the two device ceilings
(render then forward on one stream; render ∥ forward as the GPU work unit queues them)."""
from __future__ import annotations

import re

import pytest
import torch

from labeler.bench_generate import _overlapped_rate
from labeler.bench_generate_report import BenchReport, PassFigures
from labeler.thread_clock import ZERO, ThreadTimes


def _pass(**figures) -> PassFigures:
    base = dict(views=25600, seconds=3.0, phase_seconds={"copy": 0.4, "render": 0.3, "forward": 2.7}, issue_seconds={},
                issue_max={}, compiles=0, batches=100, loop=ZERO, ramp_seconds=0.0, drain_seconds=0.0)
    return PassFigures(**{**base, **figures})


def _report(device: str, pipeline: PassFigures | None = None, **figures) -> BenchReport:
    base = dict(device=device, model="m", batch_views=256, amp="bf16", views_per_sample=8, decode_workers=16,
                decode_pool="process", shards_in_flight=18, store_writers=4, render_backend="torch",
                jpeg_decoder="torchvision (Pillow's pixels)",
                pipeline_compiled=True, channels_last=True, pipeline=pipeline or _pass(),
                eager_rate=4000.0, compiled_rate=10000.0, graphed_rate=9600.0, flops_per_view=14e9, peak_tflops=989.0,
                render_rate=96000.0)
    return BenchReport(**{**base, **figures})


def test_on_a_gpu_only_the_forward_keeps_the_compute_stream_busy_and_the_measured_overlap_is_the_ceiling():
    report = _report("NVIDIA H200", overlapped_rate=9400.0)
    out = report.format()
    assert report.busy_phases == ("forward",)
    assert report.device_ceiling == 9400.0
    serial = 1 / (1 / 96000 + 1 / 9600)
    assert report.serial_ceiling == pytest.approx(serial)
    assert re.search(rf"render \+ forward +{serial:.1f} views/s +\(one after the other on one stream\) / compiled "
                     rf"forward = {serial / 10000:.2f}", out), out
    assert re.search(r"render ∥ forward +9400\.0 views/s .*its device ceiling\) / compiled forward = 0\.94", out), out
    # The render ran beside the forward: the compute stream idled 3.0 − 2.7 s, not 3.0 − (0.3 + 2.7).
    assert re.search(r"device idle +0\.30 s +10\.0 %  wall − \(forward\): the device's compute waited for decoded "
                     r"batches, copies or renders", out), out
    assert "27.0 ms of forward on the device per batch" in out
    assert f"pipeline / device ceiling = {25600 / 3.0 / 9400:.2f} (the rest: the device waited" in out


def test_a_gpu_report_says_the_longest_issue_of_each_device_phase_and_the_compiles_inside_the_timed_run():
    report = _report("NVIDIA H200", _pass(issue_seconds={"copy": 1.33, "render": 7.0, "forward": 0.1},
                                          issue_max={"copy": 0.02, "render": 6.1, "forward": 0.004}, compiles=2))
    out = report.format()
    assert "(the host took 7.00 s to issue it, its longest batch 6100.0 ms)" in out, out
    assert "(the host took 0.10 s to issue it, its longest batch 4.0 ms)" in out, out
    assert ("torch.compile during the timed pipeline: 2 graph(s) built (a compile the warm-up missed: its seconds "
            "count in the pipeline)") in out, out
    assert "device loop thread, where" not in out  # no samples: no section
    sampled = _report("NVIDIA H200", _pass(loop_samples=2000, loop_stacks=(
        "  55.0 %  labeler/render_batch.py:300 render_batch → __call__ (torch/x.py)",))).format()
    assert re.search(r"device loop thread, where its wall time went \(2000 samples of its stack every 5 ms during the "
                     r"pipeline.*\n    55\.0 %  labeler/render_batch\.py:300", sampled), sampled
    clean = _report("NVIDIA H200").format()
    assert "torch.compile during the timed pipeline: 0 graph(s) built\n" in clean, clean


def test_an_earlier_pass_is_summarised_beside_the_timed_one_with_what_it_paid_once():
    """The timed pipeline is the last pass over the shards; each earlier one gets its rate, compiles, host issue
    times, pin seconds and most sampled places, so a one-off cost (a compile, fresh page-locked buffers) stands
    apart from a per-batch one."""
    first = _pass(seconds=8.0, phase_seconds={"pin": 6.5}, issue_seconds={"copy": 1.3, "render": 6.9, "forward": 0.1},
                  issue_max={"copy": 0.05, "render": 3.6, "forward": 0.002}, compiles=1,
                  loop=ThreadTimes(wall=6.0, cpu=5.0, run_queue=0.4, process_cpu=9.0),
                  loop_stacks=("  40.0 %  labeler/render_batch.py:300 render_batch → __call__ (torch/x.py)",),
                  loop_samples=1600, allocator={"mallocs": 40, "frees": 0, "retries": 0, "page-locked allocs": 130,
                                                "page-locked alloc us": 5_900_000})
    timed = _pass(allocator={"mallocs": 0, "frees": 0, "retries": 0, "page-locked allocs": 0, "page-locked alloc us": 0})
    out = _report("NVIDIA H200", timed, earlier_passes=(first,)).format()
    assert "(25600 views in 3.00 s, teacher compiled; pass 2 of 2: the shards labelled again, warm)" in out, out
    assert re.search(r"pipeline, pass 1 of 2 +3200\.0 views/s +\(25600 views in 8\.00 s; torch\.compile built 1 "
                     r"graph\(s\)\) / compiled forward = 0\.32\n", out), out
    assert ("  its host side: issuing copy 1.30 s (longest 50.0 ms), render 6.90 s (longest 3600.0 ms), forward "
            "0.10 s (longest 2.0 ms); pin 6.50 s; device loop host work 60.0 ms per batch, 50.0 ms of it on a "
            "CPU, 10.0 ms not running: 4.0 ms waiting for a free core, 6.0 ms asleep (the GIL held by another thread "
            "of the process, or a lock, queue or sync)\n  its allocator calls: 40 mallocs 0 frees 0 retries; 130 page-locked allocs in 5900.0 ms\n") in out, out
    assert ("allocator calls during the pipeline: 0 mallocs 0 frees 0 retries; 0 page-locked allocs in 0.0 ms (steady "
            "work makes none") in out, out
    assert re.search(r"its device loop thread's most sampled places \(1600 samples\):\n    40\.0 %  "
                     r"labeler/render_batch\.py:300", out), out
    single = _report("NVIDIA H200").format()
    assert "pass 1 of" not in single and "pass 2 of 2" not in single
    assert "allocator calls" not in single  # not measured (a CPU): no line


def test_a_gpu_report_splits_the_loops_time_not_running_into_waiting_for_a_core_and_asleep():
    """Wall − CPU of the device loop's host work, split by the run-queue delay where the kernel gives it; the CPU
    the process's other threads (shard threads: pinning, filing) used meanwhile, for a GIL it would take."""
    loop = ThreadTimes(wall=7.0, cpu=5.0, run_queue=0.5, process_cpu=11.0)
    out = _report("NVIDIA H200", _pass(loop=loop)).format()
    assert ("device loop host work: 70.0 ms per batch (issuing it, filing its results), 50.0 ms of it on a CPU; "
            "20.0 ms not running: 5.0 ms waiting for a free core, 15.0 ms asleep (the GIL held by another thread of "
            "the process, or a lock, queue or sync); meanwhile the process's other threads used 60.0 ms of CPU "
            "(summed over them)") in out, out
    no_stats = _report("NVIDIA H200", _pass(loop=ThreadTimes(7.0, 5.0, None, 11.0))).format()
    assert ("20.0 ms not running (the GIL held by another thread, or no free core; this kernel keeps no run-queue "
            "figures)") in no_stats, no_stats


def test_on_a_cpu_render_and_forward_run_one_after_the_other():
    report = _report("cpu", compiled_rate=None, graphed_rate=None, pipeline_compiled=False)
    out = report.format()
    assert report.busy_phases == ("render", "forward") and report.overlapped_rate is None
    assert report.device_ceiling == pytest.approx(1 / (1 / 96000 + 1 / 4000))
    assert "render ∥ forward" not in out
    assert re.search(r"render \+ forward +\d+\.\d views/s +\(one after the other on one stream: the pipeline's "
                     r"device ceiling\)", out), out
    assert re.search(r"device idle +0\.00 s +0\.0 %  wall − \(render \+ forward\)", out), out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_rate_feeds_the_teacher_each_rendered_batch_after_its_render():
    """The side-stream render and the compute-stream teacher call are ordered by an event: every call sees its
    own batch's finished render (a missing wait would read a half-written buffer)."""
    views = torch.zeros((64, 3, 224, 224), dtype=torch.uint8, device="cuda")
    calls = {"n": 0}
    seen: list[torch.Tensor] = []

    def render() -> torch.Tensor:
        calls["n"] += 1
        out = torch.empty_like(views)
        big = torch.randn(2048, 2048, device="cuda")
        for _ in range(8):  # slow the render down, so an unordered reader would see it unfinished
            big = big @ big / 2048
        out.fill_(calls["n"] % 251)
        return out

    def teacher(batch: torch.Tensor) -> None:
        seen.append(batch.float().mean().reshape(1))

    rate = _overlapped_rate(render, teacher, views, batches=5)
    assert rate > 0
    assert [int(v.item()) for v in seen] == list(range(1, 7))  # the untimed first call, then 5 timed ones
