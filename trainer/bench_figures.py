"""The figures `stl-train bench` measures and their printed table (trainer/bench.py measures them).

`EndToEnd`: one variant's timed window of the real loop; `StepSplit`: where a step's host milliseconds went;
`BenchFigures`: everything, with `table()` and the ratios the goals are read against.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from labeler.allocator_counts import describe_allocator
from labeler.kernel_profile import PROFILE_ROWS
from labeler.stack_sampler import SAMPLE_INTERVAL_S
from labeler.thread_clock import ThreadTimes, describe_not_running
from trainer.step_timing import describe_lag

VARIANTS = ("a_none", "b_stored", "c_online")
NAMES = {"a_none": "(a) no token labels", "b_stored": "(b) stored token labels", "c_online": "(c) online teacher"}


@dataclass(frozen=True)
class EndToEnd:
    """One variant's timed window of the real loop."""

    images: int
    seconds: float
    loader_wait_s: float
    epoch_start_wait_s: float = 0.0  # the part of loader_wait_s spent on the first batch of an epoch
    epochs_started: int = 0  # epochs whose first batch came inside the window
    steps: int = 0  # batches handed to the loop inside the window
    targets_s: float = 0.0  # host seconds in make_targets (render, augment, targets: issuing them)
    device_lag: float | None = None  # steps the device still had queued as each step began (trainer.step_timing)
    allocator: dict | None = None  # CUDA allocator calls in the window (labeler.allocator_counts.AllocatorCounts)
    checkpoint_pauses: tuple[float, ...] = ()  # seconds the loop paused for each checkpoint inside the window
    checkpoint_writing_s: float = 0.0  # seconds of the window during which a checkpoint was written in the background
    loop: ThreadTimes | None = None  # the loop thread's wall, CPU and run-queue seconds in the window

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def images_per_s_between_checkpoints(self) -> float:
        """The rate with the checkpoint pauses taken out: the bench's epochs are a few dozen steps, each ending
        in a checkpoint, where an ImageNet epoch is thousands of steps."""
        return self.images / max(self.seconds - sum(self.checkpoint_pauses), 1e-9)

    def split(self) -> "StepSplit":
        n = max(self.steps, 1)
        return StepSplit(wait_ms=1e3 * self.loader_wait_s / n, targets_ms=1e3 * self.targets_s / n,
                         rest_ms=1e3 * (self.seconds - self.loader_wait_s - self.targets_s
                                        - sum(self.checkpoint_pauses)) / n,
                         device_lag=self.device_lag, allocator=self.allocator,
                         checkpoint_ms=tuple(1e3 * p for p in self.checkpoint_pauses),
                         loop=None if self.loop is None else self.loop.scaled(1e3 / n))


@dataclass(frozen=True)
class StepSplit:
    """Host milliseconds per step: waiting for the loader, issuing the targets (render, augment, token targets),
    and the rest (model forward + backward, optimizer, EMA, the loop; not the checkpoint pauses); how far the
    device lagged; and the loop's pause for each checkpoint in the window (end to end: one per epoch end)."""

    wait_ms: float | None
    targets_ms: float
    rest_ms: float
    device_lag: float | None
    allocator: dict | None = None
    checkpoint_ms: tuple[float, ...] | None = None  # None: no checkpoints in this phase (step only)
    loop: ThreadTimes | None = None  # the loop thread's ms per step: wall, on a CPU, waiting for a core

    def _checkpoints(self) -> str:
        if self.checkpoint_ms is None:
            return "-"
        if not self.checkpoint_ms:
            return "none"
        return f"{len(self.checkpoint_ms)} × {sum(self.checkpoint_ms) / len(self.checkpoint_ms):.0f} ms"

    def describe(self) -> str:
        wait = "" if self.wait_ms is None else f"wait {self.wait_ms:.1f}, "
        alloc = describe_allocator(self.allocator)
        checkpoints = "" if self.checkpoint_ms is None else f"; checkpoint pauses {self._checkpoints()}"
        loop = "" if self.loop is None else (
            f"; loop thread {self.loop.cpu:.1f} ms/step on a CPU, {describe_not_running(self.loop, 1.0)}, the "
            f"process's other threads {self.loop.other_threads_cpu:.1f} ms of CPU")
        return (f"host ms/step: {wait}targets {self.targets_ms:.1f}, model + update {self.rest_ms:.1f}; "
                f"device behind {describe_lag(self.device_lag)}{checkpoints}" + (f"; allocator: {alloc}" if alloc else "")
                + loop)

    def thread_row(self, name: str) -> str:
        """The loop thread's wall per step, split: on a CPU, waiting for a free core, asleep; other threads' CPU."""
        t = self.loop
        queue = "-" if t.run_queue is None else f"{t.run_queue:.1f}"
        asleep = f"{t.not_running:.1f}" if t.asleep is None else f"{t.asleep:.1f}"
        return f"  {name:<40} {t.wall:9.1f} {t.cpu:10.1f} {queue:>18} {asleep:>9} {t.other_threads_cpu:20.1f}"

    def row(self, name: str) -> str:
        wait = "-" if self.wait_ms is None else f"{self.wait_ms:.1f}"
        return (f"  {name:<40} {wait:>11} {self.targets_ms:9.1f} {self.rest_ms:16.1f}   {self._checkpoints():>14}   "
                f"{describe_lag(self.device_lag):<22} {describe_allocator(self.allocator)}").rstrip()


@dataclass(frozen=True)
class BenchFigures:
    device: str
    model: str
    batch_size: int
    repeats: int
    steps_per_s: dict  # variant -> steps/s, step only
    end_to_end: dict  # variant -> EndToEnd
    loader_images_per_s: dict  # "replay" / "timm" -> images/s
    loader_span: dict  # "replay" / "timm" -> (images, seconds) of the loader-alone run reported (the median)
    augment_on_device: bool
    compile_s: dict = dataclasses.field(default_factory=dict)  # what -> seconds of its first (compiling) call
    source_kb_per_sample: float | None = None  # device path: decoded bytes handed to the device per sample
    compile_mode: str = "default"
    step_split: dict = dataclasses.field(default_factory=dict)  # variant -> StepSplit of the step-only run reported
    profile: str | None = None  # torch.profiler's table of `profile_steps` step-only steps of (b)
    profile_steps: int = 0
    loop_stacks: tuple = ()  # the training loop thread's most sampled places in (b) end to end (StackSampler.top)
    loop_samples: int = 0
    photometric: str = ""  # how the device path applied the photometric ops (`_describe_photometric`)
    # torch.compile's CUDA-graph counters over the bench (CUDA graph trees): graphs it declined to capture
    # ("cudagraph_skips") and the inputs its recorded graphs copy in at every replay (non-static inputs)
    cudagraph_counters: dict = dataclasses.field(default_factory=dict)
    photometric_ms: dict = dataclasses.field(default_factory=dict)  # way → (host, wall) ms per batch, alone
    loader_workers: int = 0  # the loaders' worker processes (0: read in the main process)
    jpeg_decoder: str = ""  # what the replay loader's workers decode JPEGs with

    def ratios(self) -> dict:
        s, e, l = self.steps_per_s, {k: v.images_per_s for k, v in self.end_to_end.items()}, self.loader_images_per_s
        out = {"b/a end to end (stored vs none)": e["b_stored"] / e["a_none"],
               "b/c end to end (stored vs online teacher)": e["b_stored"] / e["c_online"],
               "b/a step only": s["b_stored"] / s["a_none"],
               "b/c step only": s["b_stored"] / s["c_online"]}
        for v in VARIANTS:
            out[f"{v[0]} end to end / step only"] = e[v] / (s[v] * self.batch_size)
        out["replay/timm (loader)"] = l["replay"] / l["timm"]
        return out

    def table(self) -> str:
        where = "device (workers decode)" if self.augment_on_device else "data workers"
        decoder = f", JPEG decode {self.jpeg_decoder}" if self.jpeg_decoder else ""
        lines = [f"stl-train bench: {self.model}, batch {self.batch_size}, device {self.device}, "
                 f"render + photometric ops in the {where}{decoder}"]
        if self.compile_s:
            lines.append(f"  torch.compile (mode {self.compile_mode}), once for every variant and phase: " + ", ".join(
                f"{k} {v:.1f} s" for k, v in self.compile_s.items()))
        else:
            lines.append("  eager (no torch.compile)")
        if self.photometric:
            lines.append(f"  photometric ops: {self.photometric}")
        if self.photometric_ms:
            lines.append("  " + describe_calls("photometric ops alone", self.photometric_ms, self.batch_size))
        if self.cudagraph_counters:
            lines.append("  torch.compile's CUDA graphs: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.cudagraph_counters.items())) + " (TORCH_LOGS=cudagraphs says why)")
        if self.source_kb_per_sample is not None:
            lines.append(f"  decoded image bytes to the device: {self.source_kb_per_sample:.1f} kB/sample "
                         f"(each view's source footprint)")
        lines.append(f"  {'end to end (real loop)':<28} {'img/s':>9} {'timed s':>8} {'loader wait':>12} {'step':>7}"
                     f"  {'of the wait: epoch starts'}")
        for k, v in self.end_to_end.items():
            wait = v.loader_wait_s / max(v.seconds, 1e-9)
            starts = v.epoch_start_wait_s / max(v.seconds, 1e-9)
            between = ""
            if v.checkpoint_pauses:
                writing = v.checkpoint_writing_s / max(v.seconds, 1e-9)
                between = (f"; {v.images_per_s_between_checkpoints:.1f} img/s without its {len(v.checkpoint_pauses)} "
                           f"checkpoint pause(s), written in the background during {writing:.0%} of it")
            lines.append(f"  {NAMES[k]:<28} {v.images_per_s:9.1f} {v.seconds:8.1f} {wait:11.0%} {1 - wait:7.0%}"
                         f"  {starts:.0%} ({v.epochs_started} epoch(s) began in the window){between}")
        lines.append(f"  step only (batches in memory, median of {self.repeats})")
        for k, v in self.steps_per_s.items():
            lines.append(f"  {NAMES[k]:<28} {v * self.batch_size:9.1f} img/s  ({v:.2f} steps/s)")
        lines.append("  host ms per step, and the steps the device still had queued as each step began")
        splits = [(f"end to end, {NAMES[k]}", v.split()) for k, v in self.end_to_end.items()]
        splits += [(f"step only, {NAMES[k]}", v) for k, v in self.step_split.items()]
        allocator = "allocator calls in the window" if any(v.allocator is not None for _, v in splits) else ""
        lines.append(f"  {'phase, variant':<40} {'loader wait':>11} {'targets':>9} {'model + update':>16}   "
                     f"{'checkpoints':>14}   {'device behind':<22} {allocator}".rstrip())
        lines += [v.row(name) for name, v in splits]
        timed = [(name, v) for name, v in splits if v.loop is not None]
        if timed:
            stats = all(v.loop.run_queue is not None for _, v in timed)
            lines.append("  the loop thread's wall ms per step: on a CPU, runnable but waiting for a free core, and "
                         + ("asleep (the loader wait, the GIL held by another thread, a device sync)" if stats else
                            "not running (this kernel keeps no run-queue figures: asleep and waiting for a core "
                            "together)") + "; the process's other threads' CPU ms per step (summed over them)")
            lines.append(f"  {'phase, variant':<40} {'wall':>9} {'on a CPU':>10} {'waiting for a core':>18} "
                         f"{'asleep' if stats else 'not run':>9} {'other threads CPU':>20}")
            lines += [v.thread_row(name) for name, v in timed]
        if self.loop_stacks:
            lines.append(f"  the loop thread in {NAMES['b_stored']} end to end, where its wall time went "
                         f"({self.loop_samples} samples of its stack every {1e3 * SAMPLE_INTERVAL_S:.0f} ms; innermost "
                         f"line of this repository → the call it was in):")
            lines += ["    " + line for line in self.loop_stacks]
        for k, v in self.loader_images_per_s.items():
            label = "replay loader (ours)" if k == "replay" else "timm train transform"
            n, seconds = self.loader_span.get(k, (0, 0.0))
            w = self.loader_workers
            workers = f"{w} worker{'s' if w > 1 else ''}, {v / w:.1f} per worker" if w else "no workers"
            lines.append(f"  {label:<28} {v:9.1f} images/s  ({n} images in {seconds:.1f} s per run, {workers})")
        for k, v in self.ratios().items():
            lines.append(f"  ratio {k:<42} {v:6.3f}")
        if self.profile:
            lines.append(f"  profile of {self.profile_steps} step-only steps, {NAMES['b_stored']} "
                         f"(torch.profiler, top {PROFILE_ROWS} by self time on the device):")
            lines += ["  " + line for line in self.profile.splitlines()]
        return "\n".join(lines)


def describe_calls(what: str, timings: dict, batch: int) -> str:
    return f"{what}, batch of {batch}: " + "; ".join(
        f"{name} host {host:.2f} ms, wall {wall:.2f} ms" for name, (host, wall) in timings.items())
