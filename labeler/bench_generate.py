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
idle. Nothing is asserted.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from labeler.allocator_counts import AllocatorCounts, describe_allocator
from labeler.bench_calls import time_calls
from labeler.decode_chunks import DecodedChunk
from labeler.device import resolve_device
from labeler.flat_images import upload_flat
from labeler.kernel_profile import PROFILE_ROWS, profile_calls
from labeler.render_batch import render_batch, warm_up_render
from labeler.stack_sampler import SAMPLE_INTERVAL_S, StackSampler
from labeler.stage_clock import COMPUTE_PHASES, DEVICE_PHASES, PHASES
from labeler.teacher import Teacher, resolve_compile
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.work_unit import ShardLabeler
from labeler.worker_settings import WorkerSettings
from labelstore.shard_format import count_samples, expand_shard_urls

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendor's data sheets; matched on the name.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 PCIe", 756.0),
                    ("A100", 312.0))

LOOP_STACK_ROWS = 12
PASS_STACK_ROWS = 4  # an earlier pass's most sampled places (its one-off costs)
PHASE_NOTES = {
    "read": "tar reading, busy seconds summed over the decode workers",
    "decode": "JPEG decode + view params (+ Pillow render on CPU), summed over the decode workers",
    "pin": "page-locking each decoded chunk as it arrives, summed over the shard threads (GPU only)",
    "decode_wait": "device loop waiting for the next decoded batch",
    "copy": "host → device copies (side stream, overlaps the compute)",
    "render": "batched render of all views (on a GPU: side stream, overlaps the previous batch's forward)",
    "forward": "teacher: forward + top-k + tail LSE, copies back queued (one CUDA graph when captured)",
    "result_wait": "device loop waiting for a batch's results (device busy)",
    "file": "device loop filing each batch's results at their shards' rows",
    "write": "the shards' store writes, summed over their threads (in writer processes on a GPU node)",
}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from the table, or None (unknown card, CPU)."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


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


@dataclass(frozen=True)
class PassFigures:
    """One pass of the work unit over every shard: its views/s and where its time went."""

    views: int
    seconds: float
    phase_seconds: dict  # every phase of PHASES (device phases from CUDA events on a GPU)
    issue_seconds: dict  # host seconds spent issuing each device phase
    issue_max: dict  # ... the longest single batch's issue of each
    compiles: int  # graphs torch.compile built during the pass (0: all before it)
    batches: int  # forward batches (padded ones included)
    loop_wall: float  # the device loop's host work (issue + filing), wall seconds
    loop_cpu: float  # ... of which its thread ran on a CPU
    ramp_seconds: float  # from the start to the first batch launched (the first decoded chunk)
    drain_seconds: float  # from the last batch filed to the end (the last shards' store writes)
    loop_stacks: tuple = ()  # the device loop thread's most sampled places (StackSampler.top)
    loop_samples: int = 0
    allocator: dict | None = None  # the CUDA allocators' calls during the pass (AllocatorCounts); None on a CPU

    @property
    def rate(self) -> float:
        return self.views / max(self.seconds, 1e-9)

    def summary(self, label: str, reference: float, ref_name: str, on_cpu: bool) -> list[str]:
        """An earlier (warm-up) pass in a few lines: the costs it paid once, set against the timed pass's."""
        issued = ", ".join(f"{p} {self.issue_seconds[p]:.2f} s (longest {1e3 * self.issue_max.get(p, 0.0):.1f} ms)"
                           for p in DEVICE_PHASES if p in self.issue_seconds)
        per = 1e3 / max(self.batches, 1)
        lines = [f"{label:24s} {self.rate:10.1f} views/s  ({self.views} views in {self.seconds:.2f} s; torch.compile "
                 f"built {self.compiles} graph(s)) / {ref_name} forward = {self.rate / reference:.2f}"]
        if not on_cpu:
            lines.append(f"  its host side: issuing {issued}; pin {self.phase_seconds.get('pin', 0.0):.2f} s; "
                         f"device loop host work {per * self.loop_wall:.1f} ms per batch, {per * self.loop_cpu:.1f} ms "
                         f"of it on a CPU")
        if self.allocator is not None:
            lines.append(f"  its allocator calls: {describe_allocator(self.allocator)}")
        if self.loop_stacks:
            lines.append(f"  its device loop thread's most sampled places ({self.loop_samples} samples):")
            lines += [f"  {line}" for line in self.loop_stacks[:PASS_STACK_ROWS]]
        return lines


@dataclass(frozen=True)
class BenchReport:
    device: str
    model: str
    batch_views: int
    amp: str
    views_per_sample: int
    decode_workers: int
    decode_pool: str
    shards_in_flight: int
    store_writers: int
    render_backend: str
    pipeline_compiled: bool
    channels_last: bool
    pipeline: PassFigures  # the timed pass (the last)
    eager_rate: float
    compiled_rate: float | None  # None: not measured (CPU without --compile true)
    graphed_rate: float | None  # the pipeline's own teacher call (forward + top-k, one CUDA graph); None: not graphed
    flops_per_view: float
    peak_tflops: float | None
    decode_rate: float = 0.0  # views/s the decode workers alone deliver (images/s × S)
    profile: str | None = None  # torch.profiler's table of `profile_batches` teacher batches (labeler.kernel_profile)
    profile_batches: int = 0
    render_rate: float | None = None  # the batched render alone on device-resident real images; None: not torch
    render_eager_rate: float | None = None  # the same render uncompiled (measured when the pipeline's is compiled)
    overlapped_rate: float | None = None  # render ∥ teacher call as a GPU pipeline queues them; None: not measured
    # Earlier passes over the same shards, warm-ups of the timed one (page-locked buffers, compiled graphs,
    # cuDNN's choices): what a job pays once, apart from what it pays per batch.
    earlier_passes: tuple[PassFigures, ...] = ()

    @property
    def pipeline_rate(self) -> float:
        return self.pipeline.rate

    @property
    def steady_rate(self) -> float:
        """Views/s between the first batch launched and the last one filed: what a long job runs at once its
        first chunk is decoded, before its last shards are written."""
        p = self.pipeline
        return p.views / max(p.seconds - p.ramp_seconds - p.drain_seconds, 1e-9)

    @property
    def serial_ceiling(self) -> float | None:
        """Views/s of render then the pipeline's teacher call (graphed forward + top-k where captured), one after
        the other: the device's ceiling were they queued on one stream (on a CPU they are)."""
        forward = self.graphed_rate or (self.compiled_rate if self.pipeline_compiled else self.eager_rate)
        if self.render_rate is None or not forward:
            return None
        return 1.0 / (1.0 / self.render_rate + 1.0 / forward)

    @property
    def device_ceiling(self) -> float | None:
        """What the pipeline reaches when the device never waits for the host: the measured render ∥ teacher
        call on a GPU (each batch rendered on the side stream during the previous one's forward), the serial
        sum elsewhere."""
        return self.overlapped_rate if self.overlapped_rate is not None else self.serial_ceiling

    @property
    def busy_phases(self) -> tuple[str, ...]:
        """The phases the device's compute could not overlap: the forward on a GPU (copy and render run beside
        it on the side stream), render and forward on a CPU."""
        return ("render",) + COMPUTE_PHASES if self.on_cpu else COMPUTE_PHASES

    @property
    def on_cpu(self) -> bool:
        return self.device.startswith("cpu")

    def tflops(self, rate: float) -> float:
        return rate * self.flops_per_view / 1e12

    def _rate_line(self, name: str, rate: float | None, note: str = "") -> str:
        if rate is None:
            return f"{name:24s} {'n/a':>10s} views/s  {'n/a':>8s} TFLOP/s  {'n/a':>6s} of peak  {note}"
        peak = f"{100 * self.tflops(rate) / self.peak_tflops:5.1f} %" if self.peak_tflops else "unknown"
        return f"{name:24s} {rate:10.1f} views/s  {self.tflops(rate):8.3f} TFLOP/s  {peak:>7s} of peak  {note}"

    def _render_line(self) -> str:
        if self.render_rate is None:
            return f"{'render alone':24s} {'n/a':>10s}          (render backend {self.render_backend}: in the decode workers)"
        compiled = ", compiled," if self.pipeline_compiled else ""
        return (f"{'render alone':24s} {self.render_rate:10.1f} views/s  ({1e3 * self.batch_views / self.render_rate:.2f} "
                f"ms per batch: the batched render{compiled} on device-resident decoded images)")

    def _pass_note(self) -> str:
        n = len(self.earlier_passes) + 1
        return f"; pass {n} of {n}: the shards labelled again, warm" if n > 1 else ""

    def format(self) -> str:
        wall = self.pipeline.seconds
        reference = self.compiled_rate if self.compiled_rate is not None else self.eager_rate
        ref_name = "compiled" if self.compiled_rate is not None else "eager (no compiled figure)"
        busy = sum(self.pipeline.phase_seconds.get(p, 0.0) for p in self.busy_phases)
        busy_name = " + ".join(self.busy_phases)
        serial_note = "" if self.overlapped_rate is not None else ": the pipeline's device ceiling"
        peak = f"{self.peak_tflops:g} TFLOP/s dense bf16" if self.peak_tflops else "unknown"
        lines = [
            f"device {self.device} (peak {peak}), model {self.model}, batch {self.batch_views} views, amp {self.amp}, "
            f"{self.views_per_sample} views/sample, {self.decode_workers} decode "
            f"{'processes' if self.decode_pool == 'process' else 'threads'}, "
            f"{self.shards_in_flight} shard(s) in flight, {self.store_writers or 'no'} store writer process(es), "
            f"render {self.render_backend}, teacher memory {'channels_last' if self.channels_last else 'contiguous'}",
            f"forward FLOPs {self.flops_per_view / 1e9:.2f} GFLOP/view (torch.utils.flop_counter)",
            self._rate_line("pipeline", self.pipeline_rate,
                            f"({self.pipeline.views} views in {wall:.2f} s, teacher "
                            f"{'compiled' if self.pipeline_compiled else 'eager'}{self._pass_note()})"),
            f"{'decode workers alone':24s} {self.decode_rate:10.1f} views/s  (the CPU side's ceiling, no device work)",
            self._rate_line("bare forward eager", self.eager_rate),
            self._rate_line("bare forward compiled", self.compiled_rate,
                            "" if self.compiled_rate is not None else "(not measured on CPU; --compile true measures it)"),
            *([self._rate_line("graphed forward + top-k", self.graphed_rate,
                               "(the pipeline's teacher call on device-resident views: its device ceiling)")]
              if self.graphed_rate is not None else []),
            f"pipeline / {ref_name} forward = {self.pipeline_rate / reference:.2f}",
            f"{'pipeline, steady':24s} {self.steady_rate:10.1f} views/s  (first batch launched → last filed; "
            f"{self.pipeline.ramp_seconds:.2f} s before it: the first decoded chunk, {self.pipeline.drain_seconds:.2f} s after: the "
            f"last shards' writes) / {ref_name} forward = {self.steady_rate / reference:.2f}",
            *[line for i, p in enumerate(self.earlier_passes)
              for line in p.summary(f"pipeline, pass {i + 1} of {len(self.earlier_passes) + 1}", reference, ref_name,
                                    self.on_cpu)],
            self._render_line(),
            *([f"{'render alone, eager':24s} {self.render_eager_rate:10.1f} views/s  (the same render uncompiled: "
               f"{1e3 * self.batch_views / self.render_eager_rate:.2f} ms per batch)"]
              if self.render_eager_rate is not None else []),
            *([f"{'render + forward':24s} {self.serial_ceiling:10.1f} views/s  (one after the other on one "
               f"stream{serial_note}) / {ref_name} forward = {self.serial_ceiling / reference:.2f}"]
              if self.serial_ceiling is not None else []),
            *([f"{'render ∥ forward':24s} {self.overlapped_rate:10.1f} views/s  (each batch rendered on the side "
               f"stream during the previous batch's forward, as the pipeline queues them: its device ceiling) / "
               f"{ref_name} forward = {self.overlapped_rate / reference:.2f}"]
              if self.overlapped_rate is not None else []),
            *([f"pipeline / device ceiling = {self.pipeline_rate / self.device_ceiling:.2f} (the rest: the device "
               f"waited for the host side)"] if self.device_ceiling else []),
            f"torch.compile during the timed pipeline: {self.pipeline.compiles} graph(s) built"
            + (" (a compile the warm-up missed: its seconds count in the pipeline)" if self.pipeline.compiles else ""),
            f"wall-time breakdown of the pipeline ({wall:.2f} s):",
        ]
        for phase in PHASES:
            sec = self.pipeline.phase_seconds.get(phase, 0.0)
            longest = (f", its longest batch {1e3 * self.pipeline.issue_max[phase]:.1f} ms" if phase in self.pipeline.issue_max else "")
            issued = (f" (the host took {self.pipeline.issue_seconds[phase]:.2f} s to issue it{longest})"
                      if phase in self.pipeline.issue_seconds and not self.on_cpu else "")
            lines.append(f"  {phase:12s} {sec:8.2f} s  {100 * sec / wall:6.1f} %  {PHASE_NOTES[phase]}{issued}")
        idle = max(0.0, wall - busy)
        waited = "decoded batches or copies" if self.on_cpu else "decoded batches, copies or renders"
        lines.append(f"  {'device idle':12s} {idle:8.2f} s  {100 * idle / wall:6.1f} %  wall − ({busy_name}): "
                     f"the device's compute waited for {waited} (see decode_wait)")
        if self.pipeline.batches:
            per = 1e3 / self.pipeline.batches
            lines.append(f"device loop: {self.pipeline.batches} batches, {per * wall:.1f} ms of wall and "
                         f"{per * busy:.1f} ms of {busy_name} on the device per batch")
            if self.on_cpu:  # the loop computes each batch itself, partly on torch's threads
                lines.append(f"device loop host work: {per * self.pipeline.loop_wall:.1f} ms per batch (on a CPU: the batch's "
                             f"render and forward themselves, and filing its results)")
            else:
                lines.append(f"device loop host work: {per * self.pipeline.loop_wall:.1f} ms per batch (issuing it, filing its "
                             f"results), {per * self.pipeline.loop_cpu:.1f} ms of it on a CPU; "
                             f"{per * max(0.0, self.pipeline.loop_wall - self.pipeline.loop_cpu):.1f} ms runnable but not running "
                             f"(the GIL held by another thread, or no free core)")
        if self.pipeline.allocator is not None:
            lines.append(f"allocator calls during the pipeline: {describe_allocator(self.pipeline.allocator)} (steady "
                         f"work makes none: a cudaMalloc or page-locked allocation can stall the device's streams)")
        if self.pipeline.loop_stacks:
            lines.append(f"device loop thread, where its wall time went ({self.pipeline.loop_samples} samples of its stack "
                         f"every {1e3 * SAMPLE_INTERVAL_S:.0f} ms during the pipeline; innermost line of this repository "
                         f"→ the call it was in):")
            lines += [f"  {line}" for line in self.pipeline.loop_stacks]
        if self.profile:
            what = "render + " if self.render_rate is not None else ""
            lines.append(f"profile of {self.profile_batches} batches ({what}forward + top-k + tail as the pipeline "
                         f"runs them, kernel by kernel; torch.profiler, top {PROFILE_ROWS} by self time on the device):")
            lines += self.profile.splitlines()
        return "\n".join(lines)


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


def _pipeline_pass(work: ShardLabeler, num_shards: int) -> PassFigures:
    """Label every shard once with the whole work unit, timed, and say where the time went. The decode processes,
    store writers and device loop are started (and warmed up) before the clock runs and stopped after it."""
    work.start(wait=True)
    clock = work.clock
    before, issued_before, batches_before = dict(clock.seconds), dict(clock.issue_seconds), work.batches
    loop_before = (clock.loop_wall, clock.loop_cpu)
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
                       loop_wall=clock.loop_wall - loop_before[0], loop_cpu=clock.loop_cpu - loop_before[1],
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
                       render_backend=work.render_backend,
                       pipeline_compiled=teacher.compiled, channels_last=teacher.channels_last, pipeline=runs[-1],
                       eager_rate=eager_rate, compiled_rate=compiled_rate, graphed_rate=graphed_rate,
                       flops_per_view=fpv, peak_tflops=bf16_peak_tflops(name), profile=profile,
                       profile_batches=profile_batches, decode_rate=decode_rate, render_rate=render_rate,
                       render_eager_rate=render_eager_rate, overlapped_rate=overlapped_rate,
                       earlier_passes=tuple(runs[:-1]))
