"""`stl-train bench`: what stored token labels cost a student, measured on the same shards and model.

End to end (what a user gets): `trainer.loop.train` itself, with the real loader (persistent workers,
the configured augment device), targets, compile, AMP and EMA, run for `seconds` after `warmup` steps, for
  (a) no token labels: class target only (mixing and erasing as in training), Eq. 5 with β = 0;
  (b) stored token labels (ours): + Gumbel token targets drawn on the device from the stored top-k logits;
  (c) online teacher (the reference method): + a same-size teacher forward (eval, no grad) every step, its
      dense token logits turned into Gumbel token targets by the same sampler.
The time is split into loader wait (the loop blocked on the next batch) and the rest (the step); the part of
the wait spent on epochs' first batches is printed too (the next epoch is started ahead: data.overlap_epochs),
and so are the checkpoint pauses of its epoch ends, with the rate between them (the bench's epochs are a few
dozen steps; a real one is thousands).
Step only: the same three variants on batches already in memory (only the step is timed).
Both phases also print the host milliseconds per step (loader wait, issuing the targets, the rest) and how
many steps the device still had queued as each step began (`trainer.step_timing`): near 0 the device waited
for the host, near 1 or more the device was the limit. `profile_steps` adds torch.profiler's top kernels of
that many step-only steps of (b) (`labeler.kernel_profile`).
Data-loader images/s on the same shards: the student's loader vs timm's standard train transform, each read
epoch after epoch as training reads it, timed from its first batch for at least `loader_seconds`.
One student and one teacher module serve every variant and both phases (weights reset between runs), so with
`--compile` each is compiled once, before anything is timed; the compile times are printed.
Nothing is asserted; the figures are printed with their ratios (goals on a GPU: b/a >= 0.95, b/c >= 1.25,
end to end / step only >= 0.9).
"""
from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from labeler.bench_calls import synchronize, time_calls
from labeler.device import prefer_fastest_convolutions
from labeler.jpeg_decode import jpeg_decoder_name
from labeler.kernel_profile import profile_calls
from labeler.models import TokenForward, create_token_model, token_grid
from labeler.render_batch import warm_up_render
from labeler.stack_sampler import SAMPLE_INTERVAL_S, StackSampler
from trainer.checkpoint import StopRequest
from trainer.config import ModelConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig
from trainer.data_config import DataConfig, TokenLabelConfig
from trainer.distributed import DistInfo, resolve_device
from trainer.loader import build_labeler_loader, build_student_loader
from trainer.loop import amp_context, begin_step, compile_fixed_shapes, compile_loss, split_outputs, train
from trainer.losses import student_loss
from trainer.optim import create_optimizer
from trainer.photometric_graph import PhotometricGraph
from trainer.photometric_torch import apply_photometric
from trainer.run_log import RunLog
from trainer.run_stage import loader_epochs
from trainer.bench_figures import NAMES, VARIANTS, BenchFigures, EndToEnd, StepSplit, describe_calls
from trainer.step_timing import HostTimer, StepWindow
from trainer.target_builder import TargetBuilder
from trainer.token_targets import token_targets

LOOP_STACK_ROWS = 14
NO_FULL_BATCH = "bench: the shards yield no full batch in an epoch; lower --batch-size"
# Paper Eq. 5 with β = 1, every variant and phase. Compiled by the loop (model.compile) and by SharedStudent for
# the step-only runs: torch.compile keeps the graphs on the function's code, so the two share one compile.
BENCH_LOSS = partial(student_loss, beta=1.0)


@dataclass(frozen=True)
class BenchSettings:
    shards: tuple[str, ...]
    labels: str
    labeler: str
    model: str = "fan_test_p4_hybrid_token"
    seconds: float = 60.0  # timed end-to-end run per variant, after the warm-up steps
    steps: int = 20  # timed steps per variant for the step-only figures
    warmup: int = 3
    batch_size: int = 16
    workers: int = 0
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode (trainer.config.COMPILE_MODES)
    augment_device: str = "auto"
    photometric_graph: bool = True  # data.photometric_graph
    seed: int = 0
    repeats: int = 3  # step-only and loader runs interleaved this many times; the median is reported
    loader_seconds: float = 10.0  # each loader-alone run reads for at least this long (several epochs)
    profile_steps: int = 0  # > 0: also profile this many step-only steps of (b) and print the top kernels

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("bench: give --shards (the shards labelled in --labels)")
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1 or self.workers < 0 or self.repeats < 1:
            raise ValueError("bench: steps and batch size must be >= 1, warmup and workers >= 0")
        if self.profile_steps < 0:
            raise ValueError(f"bench: --profile-steps must be >= 0, got {self.profile_steps}")
        ModelConfig(name=self.model, compile=self.compile, compile_mode=self.compile_mode)  # the config's own checks
        if not self.seconds > 0:
            raise ValueError(f"bench: --seconds must be > 0, got {self.seconds}")
        if not self.loader_seconds >= 0:
            raise ValueError(f"bench: --loader-seconds must be >= 0, got {self.loader_seconds}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"bench: amp must be none, bf16 or fp16, got {self.amp!r}")


def _time_loader(loader, min_images: int, min_seconds: float = 0.0) -> tuple[float, int, float]:
    """(images/s, images, seconds) of the loader alone, read as training reads it (epoch after epoch, the next
    one started ahead) until both `min_images` and `min_seconds` are reached; the clock starts at the first
    batch, so starting the workers is not in the figure.

    Each worker hands over whole batches of its own shards, and at an epoch's start they all begin together, so
    batches arrive in bursts of about one per worker. A window of one or two bursts measures mostly where it
    happens to end; `min_seconds` spanning several epochs measures the rate the workers keep up."""
    epochs = loader_epochs(loader)
    n, start, epoch = 0, None, 0

    def done() -> bool:
        return n >= min_images and time.perf_counter() - start >= min_seconds

    while start is None or not done():
        got = False
        for batch, _ in epochs(epoch, {}):
            got = True
            if start is None:
                start = time.perf_counter()
                continue
            n += len(batch["label"])
            if done():
                break
        if not got:
            raise ValueError(NO_FULL_BATCH)
        epoch += 1
    seconds = time.perf_counter() - start
    return n / max(seconds, 1e-9), n, seconds


class TimedBatches:
    """Wraps the loop's `epoch_batches`: times every wait for the next batch, opens the timed window at the
    request of batch `warmup + 1` and closes it at the first request `seconds` later, then asks the loop to
    stop (the batch handed over at that moment is outside the window). Windows span epochs."""

    def __init__(self, epoch_batches, *, warmup: int, seconds: float, stop: StopRequest, device: torch.device):
        self.epoch_batches, self.warmup, self.seconds, self.stop, self.device = epoch_batches, warmup, seconds, stop, device
        self.requested, self.start, self.end, self.images, self.wait = 0, None, None, 0, 0.0
        self.epoch_start_wait, self.epochs_started, self.steps = 0.0, 0, 0
        self.window = StepWindow(device)  # the caller wraps the loop's make_targets with window.targets

    def __call__(self, epoch: int, position: dict):
        batches = iter(self.epoch_batches(epoch, position))
        first = True
        while True:
            t0 = time.perf_counter()
            if self.requested == self.warmup:
                synchronize(self.device)  # the warm-up's queued device work is not in the window
                self.window.open()
                t0 = self.start = time.perf_counter()
            if self.start is not None and self.end is None:
                self.window.mark()  # the previous step is issued: how much of the device's queue is left
            item = next(batches, None)
            t1 = time.perf_counter()
            if item is None:
                if first:
                    raise ValueError(NO_FULL_BATCH)
                return
            self.requested += 1
            if self.start is not None and self.end is None:
                if t0 - self.start >= self.seconds and self.requested > self.warmup + 1:
                    self.window.close(lambda: synchronize(self.device))
                    self.end = time.perf_counter()
                    self.stop.requested = True
                else:
                    self.wait += t1 - t0
                    self.images += len(item[0]["label"])
                    self.steps += 1
                    if first:
                        self.epoch_start_wait += t1 - t0
                        self.epochs_started += 1
            first = False
            yield item

    def figures(self, checkpoint_pauses=(), checkpoint_writes=()) -> EndToEnd:
        """The window's figures; `checkpoint_pauses` / `checkpoint_writes`: the run's `TrainResult` fields, as
        (start, seconds) (the pauses that began inside the window are kept; the writes' overlap with it)."""
        if self.end is None:
            raise RuntimeError("bench: the timed window never closed (the run ended first)")
        writing = sum(max(0.0, min(start + seconds, self.end) - max(start, self.start))
                      for start, seconds in checkpoint_writes)
        return EndToEnd(images=self.images, seconds=self.end - self.start, loader_wait_s=self.wait,
                        epoch_start_wait_s=self.epoch_start_wait, epochs_started=self.epochs_started,
                        steps=self.steps, targets_s=self.window.targets_s, device_lag=self.window.device_lag,
                        allocator=self.window.allocator, checkpoint_pauses=tuple(
                            seconds for start, seconds in checkpoint_pauses if self.start <= start < self.end),
                        checkpoint_writing_s=writing, loop=self.window.loop)


def _variant_targets(variant: str, builder: TargetBuilder, teacher_forward, teacher_grid, tokens: TokenLabelConfig,
                     num_classes: int, amp: str, memory_format):
    """The loop's make_targets for one variant (c: the online teacher labels the student's batch, in the
    student's memory format: one layout, so a compiled teacher never sees another stride)."""
    def make_targets(batch, device, step):
        images, cls_target, token_target = builder(batch, step)
        if variant == "c_online":
            with torch.no_grad(), amp_context(device, amp):
                _, teacher_tokens = split_outputs(teacher_forward(images.contiguous(memory_format=memory_format)))
            gen = torch.Generator(device=device).manual_seed(int(step))
            token_target = token_targets(teacher_tokens.float(), None, None, num_classes=num_classes, cfg=tokens,
                                         src_grid=teacher_grid, generator=gen)
        return images, cls_target, token_target
    return make_targets


class SharedStudent:
    """One student (and one same-size online teacher) for every variant and both phases of the bench: with
    `compile`, their forwards and the student's loss are compiled once (fixed shapes) and reused by every run
    (the loss has a second graph for (a), which has no token target); `reset()` puts the initial weights back (each run builds its own optimizer)."""

    def __init__(self, s: BenchSettings, num_classes: int, device: torch.device, memory_format):
        torch.manual_seed(s.seed)
        self.model = create_token_model(s.model, num_classes=num_classes).to(device, memory_format=memory_format)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.teacher = create_token_model(s.model, num_classes=num_classes).to(device, memory_format=memory_format).eval()
        self.forward, self.teacher_forward = TokenForward(self.model), TokenForward(self.teacher)
        self.loss = BENCH_LOSS
        if s.compile:
            self.forward = compile_fixed_shapes(self.forward, s.compile_mode)
            self.teacher_forward = compile_fixed_shapes(self.teacher_forward, s.compile_mode)
            self.loss = compile_loss(self.loss)
        self.mode = s.compile_mode if s.compile else "default"
        self.seed = s.seed

    def reset(self) -> None:
        self.model.load_state_dict(self.initial)
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        torch.manual_seed(self.seed)


def _compile_seconds(shared: SharedStudent, builder: TargetBuilder, batch, device, memory_format, amp: str) -> dict:
    """Run the compiled student (forward + backward) and teacher (forward) once: the compile time, printed."""
    out = {}
    images, cls_target, token_target = builder(batch, 0)
    images = images.contiguous(memory_format=memory_format)
    synchronize(device)
    t0 = time.perf_counter()
    begin_step(shared.mode)
    with amp_context(device, amp):
        cls_logits, token_logits = split_outputs(shared.forward(images))
    shared.loss(cls_logits, token_logits, cls_target, token_target).total.backward()
    synchronize(device)
    out["student (forward + backward)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    begin_step(shared.mode)
    with torch.no_grad(), amp_context(device, amp):
        shared.teacher_forward(images)
    synchronize(device)
    out["teacher (forward)"] = time.perf_counter() - t0
    shared.reset()
    return out


def _source_kb_per_sample(batches) -> float | None:
    """Decoded image bytes a device-path batch hands to the device per sample (None on the CPU path)."""
    flats = [b["source"] for b in batches if "source" in b]
    n = sum(len(f) for f in flats)
    return sum(f.data.numel() for f in flats) / n / 1e3 if n else None


def run_bench(s: BenchSettings, report: Callable[[str], None] = lambda line: None) -> BenchFigures:
    """All the figures (printed by `BenchFigures.table`); `report` gets one line as each is measured, so a
    run cut short by a time limit still leaves what it measured."""
    device = resolve_device(s.device)
    prefer_fastest_convolutions(device)  # as the training loop does
    counters_before = _cudagraph_counters()
    # The default RandAugment (the paper's m9 mstd0.5) for both loaders, so they run the same colour ops.
    data = DataConfig(shards=s.shards, batch_size=s.batch_size, workers=s.workers, seed=s.seed, drop_last=True,
                      augment_device=s.augment_device, photometric_graph=s.photometric_graph)
    tokens = TokenLabelConfig()
    on_device = data.augment_on_device(device)
    loader = build_student_loader(data, labels=s.labels, labeler=s.labeler, rank=0, world_size=1,
                                  pin_memory=device.type == "cuda", render_on_device=on_device)
    num_classes, hw = loader.num_classes, loader.input_size
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    shared = SharedStudent(s, num_classes, device, memory_format)
    teacher_grid = token_grid(shared.teacher, hw)

    photometric = PhotometricGraph(graphed=data.photometric_graph)  # one capture for every variant and phase

    def builder_for(variant: str) -> TargetBuilder:
        return TargetBuilder(num_classes=num_classes, data=data, tokens=tokens if variant == "b_stored" else None,
                             store_grid=loader.store_grid, student_grid=token_grid(shared.model, hw), device=device,
                             view_spec=loader.view_spec, photometric=photometric)

    def targets_for(variant: str):
        return _variant_targets(variant, builder_for(variant), shared.teacher_forward, teacher_grid, tokens,
                                num_classes, s.amp, memory_format)

    # ---- batches for the step-only figures (and the compile warm-up), held in memory ----
    batches, need = [], s.steps + s.warmup
    while len(batches) < need:
        before = len(batches)
        loader.set_epoch(len(batches))
        batches.extend(b for _, b in zip(range(need - len(batches)), loader))
        if len(batches) == before:
            raise ValueError(NO_FULL_BATCH)
    compile_s = _compile_seconds(shared, builder_for("b_stored"), batches[0], device, memory_format, s.amp) \
        if s.compile else {}
    if on_device and device.type == "cuda":  # the device renderer is compiled (labeler.render_batch): not in a timed run
        t0 = time.perf_counter()
        warm_up_render(loader.view_spec, 1, device)
        synchronize(device)
        compile_s["renderer (sample_views)"] = time.perf_counter() - t0
    if compile_s:
        report("measured: torch.compile " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    photometric_ms = _time_photometric(builder_for("b_stored"), batches[0], device) \
        if on_device and device.type == "cuda" and "photo_ops" in batches[0] else {}
    if photometric_ms:
        report("measured: " + describe_calls("photometric ops alone", photometric_ms, s.batch_size))

    # ---- step only, first (the figure end to end is read against): the variants on batches in memory ----
    def step_fn(variant: str, targets: HostTimer) -> Callable[[int], None]:
        """One step-only training step on in-memory batch i (fresh weights and optimizer per call of step_fn)."""
        shared.reset()
        opt = create_optimizer(shared.model, OptimConfig(), lr=1e-4)
        make_targets = targets.wrap(targets_for(variant))

        def step(i: int) -> None:
            begin_step(shared.mode)
            images, cls_target, token_target = make_targets(batches[i], device, i)
            with amp_context(device, s.amp):
                cls_logits, token_logits = split_outputs(shared.forward(images.contiguous(memory_format=memory_format)))
            loss = shared.loss(cls_logits, token_logits, cls_target, token_target).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def steps_per_s(variant: str) -> tuple[float, StepSplit]:
        window = StepWindow(device)
        step = step_fn(variant, window.targets)
        start = 0.0
        for i in range(len(batches)):
            if i == s.warmup:
                synchronize(device)
                window.open()
                start = time.perf_counter()
            if i >= s.warmup:
                window.mark()
            step(i)
        window.close(lambda: synchronize(device))
        wall = time.perf_counter() - start
        split = StepSplit(wait_ms=None, targets_ms=1e3 * window.targets_s / s.steps,
                          rest_ms=1e3 * (wall - window.targets_s) / s.steps, device_lag=window.device_lag,
                          allocator=window.allocator,
                          loop=None if window.loop is None else window.loop.scaled(1e3 / s.steps))
        return s.steps / wall, split

    runs = {v: [] for v in VARIANTS}
    for _ in range(s.repeats):  # interleaved, so a slow spell on a shared machine hits every variant
        for v in VARIANTS:
            runs[v].append(steps_per_s(v))
    median = {v: sorted(r, key=lambda run: run[0])[len(r) // 2] for v, r in runs.items()}
    rates = {v: run[0] for v, run in median.items()}
    report("measured: step only " + ", ".join(f"{NAMES[v]} {r * s.batch_size:.1f} img/s ({median[v][1].describe()})"
                                              for v, r in rates.items()))
    profile = None
    if s.profile_steps:  # the product's path, (b): which kernels (ops on a CPU) a step's time goes to
        step = step_fn("b_stored", HostTimer())
        for i in range(s.warmup):
            step(i)
        profile = profile_calls(lambda i: step(s.warmup + i % s.steps), s.profile_steps, device)
        report(f"measured: profile of {s.profile_steps} step-only steps, {NAMES['b_stored']}:\n{profile}")

    # ---- end to end: trainer.loop.train with the real loader, for `seconds` after the warm-up ----
    cfg = TrainConfig(model=ModelConfig(name=s.model, num_classes=num_classes, compile=s.compile,
                                        compile_mode=s.compile_mode,
                                        channels_last=device.type == "cuda"),
                      data=data, tokens=tokens,
                      schedule=ScheduleConfig(epochs=10**6, warmup_epochs=0, cooldown_epochs=0),
                      run=RunConfig(device=str(device), amp=s.amp, tensorboard=False, progress_bar=False))
    end_to_end, loop_sampler = {}, None
    for variant in VARIANTS:
        shared.reset()
        stop = StopRequest()
        timed = TimedBatches(loader_epochs(loader), warmup=s.warmup, seconds=s.seconds, stop=stop, device=device)
        sampler = StackSampler(interval=SAMPLE_INTERVAL_S) if variant == "b_stored" else None
        with tempfile.TemporaryDirectory(prefix="stl-bench-") as out, (sampler or nullcontext()):
            result = train(model=shared.model, arch=s.model, cfg=cfg, out_dir=out, epoch_batches=timed,
                           make_targets=timed.window.targets.wrap(targets_for(variant)),
                           compute_loss=BENCH_LOSS, steps_per_epoch=loader.batches_per_epoch(),
                           info=DistInfo(device=device), log=RunLog.disabled(), stop=stop, forward=shared.forward)
        end_to_end[variant] = e2e = timed.figures(result.checkpoint_pauses, result.checkpoint_writes)
        loop_sampler = sampler or loop_sampler
        if sampler is not None:
            report(f"measured: the loop thread in {NAMES[variant]} end to end, {sampler.samples} samples:\n"
                   + "\n".join(sampler.top(LOOP_STACK_ROWS)))
        report(f"measured: {NAMES[variant]} end to end {e2e.images_per_s:.1f} img/s, loader wait "
               f"{e2e.loader_wait_s / max(e2e.seconds, 1e-9):.0%} ({e2e.seconds:.1f} s); {e2e.split().describe()}")

    # ---- data-loader comparison: the student's loader vs timm's standard train transform, same shards ----
    want = max(s.batch_size * (s.steps + s.warmup), 4 * s.batch_size)
    timm_loader = build_labeler_loader(dataclasses.replace(data, input_size=hw), rank=0, world_size=1)
    _time_loader(timm_loader, s.batch_size)  # start its workers; the student loader's are warm
    loader_runs = {"replay": [], "timm": []}  # (images/s, images, seconds) of each run
    for _ in range(s.repeats):
        for name, ld in (("replay", loader), ("timm", timm_loader)):
            loader_runs[name].append(_time_loader(ld, want, s.loader_seconds))
    median_run = {name: sorted(runs)[len(runs) // 2] for name, runs in loader_runs.items()}  # by images/s
    replay_rate, timm_rate = median_run["replay"][0], median_run["timm"][0]
    report(f"measured: loaders alone, replay {replay_rate:.1f} vs timm {timm_rate:.1f} images/s")

    where = f"{device} ({platform.processor() or platform.machine()})" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)
    return BenchFigures(device=where, model=s.model, batch_size=s.batch_size, repeats=s.repeats, steps_per_s=rates,
                        end_to_end=end_to_end, loader_images_per_s={"replay": replay_rate, "timm": timm_rate},
                        loader_span={name: run[1:] for name, run in median_run.items()}, loader_workers=s.workers, augment_on_device=on_device, compile_s=compile_s,
                        compile_mode=s.compile_mode, step_split={v: run[1] for v, run in median.items()},
                        profile=profile, profile_steps=s.profile_steps,
                        loop_stacks=tuple(loop_sampler.top(LOOP_STACK_ROWS)) if loop_sampler else (),
                        loop_samples=loop_sampler.samples if loop_sampler else 0,
                        source_kb_per_sample=_source_kb_per_sample(batches),
                        photometric=_describe_photometric(photometric, on_device),
                        cudagraph_counters=_cudagraph_counters(since=counters_before)
                        if s.compile and s.compile_mode == "reduce-overhead" else {},
                        photometric_ms=photometric_ms,
                        jpeg_decoder=jpeg_decoder_name() if on_device else "Pillow")  # CPU path: Pillow renders


def _time_photometric(builder: TargetBuilder, batch: dict, device: torch.device) -> dict:
    """The batch's photometric slots alone on its rendered views, grouped by op and as one CUDA graph."""
    views = builder.render_views(batch)
    ops, args = batch["photo_ops"], batch["photo_args"]
    graph = PhotometricGraph()
    return time_calls({"grouped by op": lambda: apply_photometric(views, ops, args),
                       "one CUDA graph": lambda: graph(views, ops, args)}, device)


_CUDAGRAPH_COUNTERS = ("cudagraph_skips", "cudagraph_recorded_non_static_inputs")  # always printed, 0 included


def _cudagraph_counters(since: dict | None = None) -> dict:
    """torch.compile's CUDA-graph counters (process-wide), or their change since `since`."""
    from torch._dynamo.utils import counters

    now = {k: int(v) for k, v in counters["inductor"].items() if k.startswith("cudagraph")}
    if since is None:
        return now
    return {k: now.get(k, 0) - since.get(k, 0) for k in sorted({*now, *_CUDAGRAPH_COUNTERS})}


def _describe_photometric(graph: PhotometricGraph, on_device: bool) -> str:
    """One line: how the device path applied the photometric ops in all the bench's runs."""
    if not on_device:
        return ""
    if graph.failed:
        return f"CUDA graph capture failed, the fixed-shape ops ran op by op ({graph.failed})"
    if not graph.captured:
        return "grouped by op, launched op by op (no CUDA graph)"
    return (f"one CUDA graph per batch (trainer/photometric_graph.py, {graph.rows.capacity} rows per op and slot); "
            f"{graph.fallbacks} batch(es) took the grouped ops")
