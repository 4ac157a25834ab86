"""What `stl-labels bench generate` measured, and how it prints it (`labeler.bench_generate` measures).

`PassFigures` holds one pass of the work unit over the shards (its rate, phase seconds, host issue times,
allocator calls, sampled stacks); `BenchReport` the whole bench (the timed pass, earlier passes, the bare
forward and render figures) and its `format()`: the rates against the compiled forward and the device's
ceilings, TFLOP/s against the card's bf16 peak, and the wall-time breakdown. Pure: no device, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from labeler.allocator_counts import describe_allocator
from labeler.kernel_profile import PROFILE_ROWS
from labeler.stack_sampler import SAMPLE_INTERVAL_S
from labeler.stage_clock import COMPUTE_PHASES, DEVICE_PHASES, PHASES
from labeler.thread_clock import ThreadTimes, describe_not_running

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
    loop: ThreadTimes  # the device loop's host work (issue + filing): its thread's wall, CPU, run-queue seconds
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
                         f"device loop host work {per * self.loop.wall:.1f} ms per batch, {per * self.loop.cpu:.1f} ms "
                         f"of it on a CPU, {describe_not_running(self.loop, per)}")
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
    jpeg_decoder: str  # what the decode workers decode JPEGs with
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
            f"JPEG decode {self.jpeg_decoder}, render {self.render_backend}, "
            f"teacher memory {'channels_last' if self.channels_last else 'contiguous'}",
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
                lines.append(f"device loop host work: {per * self.pipeline.loop.wall:.1f} ms per batch (on a CPU: the batch's "
                             f"render and forward themselves, and filing its results)")
            else:
                loop = self.pipeline.loop
                lines.append(f"device loop host work: {per * loop.wall:.1f} ms per batch (issuing it, filing its "
                             f"results), {per * loop.cpu:.1f} ms of it on a CPU; {describe_not_running(loop, per)}; "
                             f"meanwhile the process's other threads used {per * loop.other_threads_cpu:.1f} ms of CPU (summed over them)")
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
