"""`stl-labels bench generate`: the labeling pipeline's views/s against the bare teacher forward.

On one device, batch shape and precision, without Ray: first the whole work unit (decode workers read
tar → decode → pack; the device loop copies → renders S views → forward → top-k → copies back; shard
writes) over the given shards into a scratch store, several shards in flight as in a job, twice by default
(the second pass is the one measured: the first pays the one-off costs a long job pays once), then the
teacher's forward alone on device-resident uint8 views of the same shape, eager and `torch.compile`d.
FLOPs per view come from `torch.utils.flop_counter` on one batch (matmuls, convolutions, attention);
TFLOP/s is FLOPs × views/s, set against the device's dense bf16 peak where the table below knows the card.
The breakdown says where the pipeline's wall time went: device phases from CUDA events, host phases from
timers (decode runs on a pool, so its busy seconds can exceed the wall time), and how long the device sat
idle. Nothing is asserted; `labeler.bench_generate_report` holds the figures and prints them.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from labeler.allocator_counts import AllocatorCounts
from labeler.bench_calls import time_calls
from labeler.bench_generate_report import LOOP_STACK_ROWS, BenchReport, PassFigures, bf16_peak_tflops
from labeler.decode_chunks import DecodedChunk
from labeler.device import resolve_device
from labeler.flat_images import upload_flat
from labeler.jpeg_decode import jpeg_decoder_name
from labeler.kernel_profile import profile_calls
from labeler.render_batch import render_batch, warm_up_render
from labeler.stack_sampler import SAMPLE_INTERVAL_S, StackSampler
from labeler.stage_clock import DEVICE_PHASES, PHASES
from labeler.teacher import Teacher, resolve_compile
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.work_unit import ShardLabeler
from labeler.worker_settings import WorkerSettings
from labelstore.shard_format import count_samples, expand_shard_urls


def flops_per_view(teacher: Teacher, views: torch.Tensor) -> float:
    """Forward FLOPs of one batch / batch size, counted by torch.utils.flop_counter (eager model).

    Counted in float32 without autocast: the count does not depend on the dtype, and under the counter's
    dispatch mode autocast leaves mixed-dtype einsum operands uncast (a dtype error on the FAN gate).
    """
    x = teacher.normalize(views)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        teacher.model.forward_tokens(x)
    return counter.get_total_flops() / views.shape[0]


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (Dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _rate(call: Callable[[torch.Tensor], object], views: torch.Tensor, batches: int) -> float:
    """Views/s of `call` on device-resident views: one untimed call first (compile, capture, autotune, allocator)."""
    _, wall_ms = time_calls({"call": lambda: call(views)}, views.device, repeats=batches, warmup=1)["call"]
    return views.shape[0] / (wall_ms / 1e3)


def _decode_alone(work: ShardLabeler, decoder, num_shards: int) -> tuple[int, float, DecodedChunk | None]:
    """The decode workers' own rate (no device): every shard decoded, as many in flight as in the pipeline.
    Also returns the first shard's first chunk (the bare render's real images and view params)."""
    first: list[DecodedChunk] = []

    def one(index: int) -> int:
        n = 0
        for chunk in decoder.submit(work.decode_job(work.store.shard(index))):
            if index == 0 and not first and chunk.num_valid:
                first.append(chunk)
            n += chunk.num_valid
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=work.shards_in_flight) as pool:
        images = sum(pool.map(one, range(num_shards)))
    return images, time.perf_counter() - start, (first[0] if first else None)


def _render_call(work: ShardLabeler, chunk: DecodedChunk | None) -> Callable[[bool], torch.Tensor] | None:
    """The device loop's render of one whole forward batch (the first decoded chunk's images, repeated if it
    holds fewer, uploaded once), compiled or not; None where the pipeline does not render on the device
    (Pillow views come from the decode workers)."""
    if chunk is None or work.chunk_mode != "pixels" or chunk.pixels is None or not chunk.num_valid:
        return None
    n, m = chunk.num_valid, work.images_per_batch
    take = np.arange(m) % n
    parts = [chunk.pixels.slice(0, n)] * (m // n) + ([chunk.pixels.slice(0, m % n)] if m % n else [])
    sources = upload_flat(parts, work.device, multiple=32)
    index = np.repeat(np.arange(m), work.spec.views)
    params = chunk.params[take].reshape(m * work.spec.views, -1)
    view_spec = work.spec.view_spec
    return lambda compiled: render_batch(sources, index, params, view_spec, compiled)


def _overlapped_rate(render: Callable[[], torch.Tensor], teacher_call: Callable[[torch.Tensor], object],
                     views: torch.Tensor, batches: int) -> float:
    """Views/s of render ∥ teacher call queued as the GPU work unit queues them: each batch rendered on a side
    stream, the teacher on the compute stream waiting for it by an event (so a batch's render runs during the
    previous batch's forward)."""
    side, compute = torch.cuda.Stream(views.device), torch.cuda.current_stream(views.device)

    def one(_: torch.Tensor) -> object:
        with torch.cuda.stream(side):
            rendered = render()
        compute.wait_stream(side)
        rendered.record_stream(compute)
        return teacher_call(rendered)

    return _rate(one, views, batches)


def _jpeg_decoder(chunk_mode: str) -> str:
    if chunk_mode == "jpeg":
        return "nvJPEG on the device (Pillow for what it refuses)"
    return "Pillow" if chunk_mode == "views" else jpeg_decoder_name()  # views: Pillow renders from Pillow's image


def _pipeline_pass(work: ShardLabeler, num_shards: int) -> PassFigures:
    """Label every shard once with the whole work unit, timed, and say where the time went. The decode processes,
    store writers and device loop are started (and warmed up) before the clock runs and stopped after it."""
    work.start(wait=True)
    clock = work.clock
    before, issued_before, batches_before = dict(clock.seconds), dict(clock.issue_seconds), work.batches
    loop_before = clock.loop
    clock.reset_span()
    graphs_before = compiled_graphs()
    sampler = StackSampler(work.device_loop_thread, interval=SAMPLE_INTERVAL_S).start()
    allocator = AllocatorCounts(work.device)
    allocator.start()
    start = time.perf_counter()
    outcomes = list(work.label_shards(range(num_shards)))
    end = time.perf_counter()
    allocations = allocator.delta()
    sampler.stop()
    compiles = compiled_graphs() - graphs_before
    ramp = (clock.first_launch - start) if clock.first_launch is not None else 0.0
    drain = (end - clock.last_filed) if clock.last_filed is not None else 0.0
    issue_max = dict(clock.issue_max)
    work.close()  # the device loop stopped: every batch's events are recorded, none is being folded in
    clock.resolve()
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"bench: shard {failed[0].url} failed: {failed[0].error}")
    return PassFigures(views=sum(o.views for o in outcomes), seconds=end - start,
                       phase_seconds={p: clock.seconds[p] - before[p] for p in PHASES},
                       issue_seconds={p: clock.issue_seconds[p] - issued_before[p] for p in DEVICE_PHASES},
                       issue_max=issue_max, compiles=compiles, batches=work.batches - batches_before,
                       loop=clock.loop.since(loop_before),
                       ramp_seconds=ramp, drain_seconds=drain, loop_stacks=tuple(sampler.top(LOOP_STACK_ROWS)),
                       loop_samples=sampler.samples, allocator=allocations)


def bench_generate(shards: list[str], model: str, batch_size: int, amp: str, views: int, topk: int = 10,
                   num_classes: int | None = None, input_size: int | None = None, device: str = "auto",
                   render_backend: str = "auto", decode_workers: int = 0, checkpoint: str | None = None,
                   compile: str = "auto", decode_device: str = "cpu", forward_batches: int | None = None,
                   keep_store: str | None = None, decode_pool: str = "auto", shards_in_flight: int = 0,
                   cuda_graph: str = "auto", channels_last: str = "auto", store_writers: int = -1,
                   profile_batches: int = 0, passes: int = 2,
                   report: Callable[[str], None] = lambda line: None) -> BenchReport:
    """Measure pipeline, bare eager and compiled forward; the teacher has random weights unless `checkpoint`.
    `report` gets one line as each figure is measured (a run cut short by a time limit still leaves them).

    The labels go to a scratch store, deleted afterwards, or to `keep_store` (labeler "bench"), which a
    training bench can then read (`stl-train bench --labels ... --labeler bench`) on a node without Ray.
    `profile_batches` > 0: also torch.profiler's top kernels of that many teacher batches.
    `passes`: the pipeline labels every shard this many times, the last pass being the one measured in full. The
    earlier ones pay what a long job pays once (page-locked host buffers for the decoded chunks, graphs compiled
    or captured, cuDNN's algorithm choices), so the last pass shows the rate a long job keeps; each earlier pass
    is summarised in a line (its rate, compiles, host issue times, pin seconds).
    """
    if profile_batches < 0:
        raise ValueError(f"bench generate: --profile-batches must be >= 0, got {profile_batches}")
    if passes < 1:
        raise ValueError(f"bench generate: --passes must be >= 1, got {passes}")
    urls = expand_shard_urls(shards)
    dev = resolve_device(device)
    worker = WorkerSettings(checkpoint=checkpoint, batch_size=batch_size, amp=amp, device=str(dev), compile=compile,
                            cuda_graph=cuda_graph, channels_last=channels_last, store_writers=store_writers,
                            render_backend=render_backend, decode_workers=decode_workers, decode_device=decode_device,
                            decode_pool=decode_pool, shards_in_flight=shards_in_flight)
    with tempfile.TemporaryDirectory(prefix="stl-bench-") as tmp:
        torch.manual_seed(0)
        spec = build_labeler_spec(name="bench", model=model, num_classes=num_classes, views=views, topk=topk,
                                  checkpoint=checkpoint, input_size=(input_size, input_size) if input_size else None)
        store, _ = open_labeler_store(keep_store or f"{tmp}/bench.zarr", seed=0, rows_per_chunk=256, spec=spec)
        store.register_shards([(u, count_samples(u)) for u in urls])
        work = ShardLabeler(store.path, "bench", worker)
        decoder = work.start(wait=True)  # decode processes start (and import) before the clock runs, as in a long job
        decode_images, decode_seconds, first_chunk = _decode_alone(work, decoder, len(urls))
        decode_rate = decode_images * views / max(decode_seconds, 1e-9)
        report(f"measured: decode workers alone {decode_rate:.1f} views/s")
        teacher = work.teacher
        h, w = spec.input_size
        fixed = torch.randint(0, 256, (work.views_per_batch, 3, h, w), dtype=torch.uint8, device=dev)
        for copy in teacher.encode_views_async(fixed):  # warm-up of the pipeline's teacher: compile (and capture)
            copy.wait()
        if work.render_backend == "torch":  # and of its renderer (compiled on a GPU)
            warm_up_render(spec.view_spec, views, dev, compiled=teacher.compiled)

        runs = [_pipeline_pass(work, len(urls)) for _ in range(passes)]
        timed = runs[-1]
        report(f"measured: pipeline {timed.rate:.1f} views/s ({timed.views} views in {timed.seconds:.2f} s"
               + (f"; pass {passes} of {passes}, pass 1: {runs[0].rate:.1f} views/s)" if passes > 1 else ")"))

        n_batches = forward_batches or max(3, round(timed.views / work.views_per_batch))
        graphed_rate = None
        if teacher.graphed is not None and teacher.graphed.captured:
            graphed_rate = _rate(teacher.encode_views_async, fixed, n_batches)
            report(f"measured: graphed forward + top-k {graphed_rate:.1f} views/s")
        elif teacher.graphed is not None:
            report(f"CUDA graph not captured: {teacher.graphed.failed}")
        layout = dict(channels_last=teacher.channels_last)  # the pipeline teacher's: the model (and layout) is shared
        eager = teacher if not teacher.compiled else Teacher(teacher.model, spec.mean, spec.std, spec.topk, dev, amp,
                                                             **layout)
        eager_rate = _rate(eager.forward, fixed, n_batches)
        report(f"measured: bare forward eager {eager_rate:.1f} views/s")
        want_compiled = resolve_compile(compile, dev)
        compiled_rate = None
        if want_compiled:
            compiled = teacher if teacher.compiled else Teacher(teacher.model, spec.mean, spec.std, spec.topk, dev, amp,
                                                                compile=True, **layout)
            compiled_rate = _rate(compiled.forward, fixed, n_batches)
            report(f"measured: bare forward compiled {compiled_rate:.1f} views/s")
        render = _render_call(work, first_chunk)
        render_rate = render_eager_rate = overlapped_rate = None
        if render is not None:
            render_rate = _rate(lambda _: render(teacher.compiled), fixed, n_batches)
            report(f"measured: render alone {render_rate:.1f} views/s")
            if teacher.compiled:  # the same render uncompiled: what compiling it gains
                render_eager_rate = _rate(lambda _: render(False), fixed, n_batches)
                report(f"measured: render alone, eager {render_eager_rate:.1f} views/s")
            if dev.type == "cuda":
                overlapped_rate = _overlapped_rate(lambda: render(teacher.compiled), teacher.encode_views_async,
                                                   fixed, n_batches)
                report(f"measured: render ∥ forward {overlapped_rate:.1f} views/s")
        profile = None
        if profile_batches:  # the pipeline's device work, not graphed so the profiler sees each kernel
            profiled = compiled if want_compiled else teacher

            def batch(_: int) -> None:
                if render is not None:
                    render(teacher.compiled)
                profiled.encode_views_on_device(fixed)

            profile = profile_calls(batch, profile_batches, dev)
            what = "render + teacher" if render is not None else "teacher"
            report(f"measured: profile of {profile_batches} batches ({what}):\n{profile}")
        fpv = flops_per_view(eager, fixed)
    name = str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev)
    return BenchReport(device=name, model=model, batch_views=work.views_per_batch, amp=amp, views_per_sample=views,
                       decode_workers=work.decode_workers, decode_pool=work.decode_pool,
                       shards_in_flight=work.shards_in_flight, store_writers=work.writers.processes,
                       render_backend=work.render_backend, jpeg_decoder=_jpeg_decoder(work.chunk_mode),
                       pipeline_compiled=teacher.compiled, channels_last=teacher.channels_last, pipeline=runs[-1],
                       eager_rate=eager_rate, compiled_rate=compiled_rate, graphed_rate=graphed_rate,
                       flops_per_view=fpv, peak_tflops=bf16_peak_tflops(name), profile=profile,
                       profile_batches=profile_batches, decode_rate=decode_rate, render_rate=render_rate,
                       render_eager_rate=render_eager_rate, overlapped_rate=overlapped_rate,
                       earlier_passes=tuple(runs[:-1]))
