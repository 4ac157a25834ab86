"""The training loop of both STL stages, reading top to bottom in phases.

`train()` takes explicit arguments (never a parsed-args object): the model, the resolved config, and three
callables that make it stage-agnostic —
- `epoch_batches(epoch, position)` yields `(batch, rank_position_after)` for one epoch on this rank, starting
  after `position` = `{}` (start of the epoch) or what a mid-epoch checkpoint saved: `{"steps": micro-batches
  done, "ranks": [rank_position of each rank]}`; rank_position_after is a dict, or a zero-argument callable
  returning it (read only at log steps, checkpoints and the epoch's end, never per step),
- `make_targets(batch, device, step)` (step = epoch · 2^24 + micro-batch index, for seeding) returns `(images, cls_target (B,C), token_target (B,T,C) | None)` on the device,
- `compute_loss(cls_logits, token_logits, cls_target, token_target)` returns `trainer.losses.LossTerms`
  (paper Eq. 2 for the labeler, Eq. 5 for the student).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import dispatch_clip_grad

from labeler.device import prefer_fastest_convolutions
from labeler.models import TokenForward
from trainer.checkpoint import (
    EXPORT, LAST, StopRequest, TrainState, check_resume_fits, export_for_labeling, load_checkpoint_file,
    checkpoint_dict, restore_checkpoint,
)
from trainer.checkpoint_writer import CheckpointWriter
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, all_reduce_sum, any_rank, barrier, seed_step, sum_over_ranks, wrap_ddp
from trainer.ema import ModelEma
from trainer.errors import NonFiniteLoss, TrainCheckpointError
from trainer.losses import LossTerms
from trainer.optim import create_optimizer, create_scheduler
from trainer.run_log import RunLog

EpochBatches = Callable[[int, dict], Iterable[tuple[Any, dict]]]
MakeTargets = Callable[[Any, torch.device, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
ComputeLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None], LossTerms]


@dataclass(frozen=True)
class TrainResult:
    """How a `train()` call ended."""

    status: str  # "finished" | "stopped" (SIGTERM: checkpoint written, resume with --resume)
    epoch: int  # epochs fully done
    global_update: int
    last_checkpoint: Path | None
    export: Path | None  # EMA export for `stl-labels generate --checkpoint` (when finished)
    last_loss: float
    # (time.perf_counter() at its start, seconds) of each checkpoint: how long the loop paused for it (queueing
    # the copy, and waiting for a previous write still in flight); the file itself is written in the background.
    checkpoint_pauses: tuple[tuple[float, float], ...] = ()
    # (time.perf_counter() at its start, seconds) of each checkpoint's background write
    checkpoint_writes: tuple[tuple[float, float], ...] = ()


def split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token models return (cls_logits, token_logits); plain models return cls_logits only."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def amp_context(device: torch.device, amp: str):
    """bf16 / fp16 autocast on the run's device, or nothing."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def compile_fixed_shapes(module: Any, mode: str = "default") -> Any:
    """`torch.compile` for one batch shape (drop-last batches); `mode` is torch.compile's (config.COMPILE_MODES)."""
    return torch.compile(module, dynamic=False, mode=None if mode == "default" else mode)


def compile_loss(compute_loss: Any) -> Any:
    """`compute_loss` compiled for fixed shapes: the soft-target cross-entropy over the dense (B, T, C) token
    targets becomes a few fused kernels (forward and backward) instead of about ten eager passes over float32
    copies of the logits, their log-probabilities and products. Always torch.compile's default mode, never CUDA
    graphs: the token target is a fresh tensor each step, which a graph would copy into its own buffer at every
    replay. torch.compile keeps its graphs on the loss function's code, so several wrappers share one compile."""
    return torch.compile(compute_loss, dynamic=False)


def begin_step(mode: str) -> None:
    """Before a step's first compiled call: with CUDA graphs (reduce-overhead) the previous step's graph outputs
    may be overwritten from here on. torch infers this itself when each step runs one backward; saying it
    also covers the bench's online teacher, a second compiled module called in the same step."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def gather_positions(position: dict, info: DistInfo) -> list[dict]:
    """Every rank's data position (each rank reads its own shards), rank order."""
    if not info.distributed:
        return [position]
    out: list = [None] * info.world_size
    torch.distributed.all_gather_object(out, position)
    return out


class LossHealth:
    """Non-finite losses, flagged on the device without a host sync or a host→device copy; `check()` (every
    log_every updates and before any checkpoint) reads the flag on every rank and reports the first bad
    (epoch, step, update)."""

    def __init__(self, device: torch.device, info: DistInfo, report: Callable[[int, int, int], None]):
        self.info, self.report = info, report
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # index into `where`, -1: none
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # notes since the last check, on the device
        self.where: list[tuple[int, int, int]] = []  # host: (epoch, step, update) of those notes

    def note(self, loss: torch.Tensor, epoch: int, step: int, update: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self.count, self.first_bad))
        self.count.add_(1)
        self.where.append((epoch, step, update))

    def check(self) -> None:
        first = int(self.first_bad)  # the one host read
        if any_rank(self.info, first >= 0)[0]:
            epoch, step, update = self.where[first] if first >= 0 else (-1, -1, -1)
            self.report(epoch, step, update)
        self.count.zero_()
        self.where.clear()


def _position(rank_position: dict | Callable[[], dict]) -> dict:
    return rank_position() if callable(rank_position) else rank_position


def _next_or_none(it: Iterator) -> Any:
    try:
        return next(it)
    except StopIteration:
        return None


def train(*, model: torch.nn.Module, arch: str, cfg: TrainConfig, out_dir: str | Path,
          epoch_batches: EpochBatches, make_targets: MakeTargets, compute_loss: ComputeLoss,
          steps_per_epoch: int, info: DistInfo | None = None, resume: str | Path | None = None,
          log: RunLog | None = None, stop: StopRequest | None = None,
          data_identity: dict | None = None, forward: torch.nn.Module | None = None) -> TrainResult:
    """Train `model` for `cfg.schedule.total_epochs`; checkpoints every epoch, every `run.checkpoint_every`
    updates and on SIGTERM. `data_identity` ({"shards": names, "num_samples": n}) is recorded and checked on resume.
    `forward`: what the loop calls instead of `TokenForward(model)` (DDP-wrapped, compiled per model.compile);
    one process only. The bench passes one forward, compiled once, to several runs on the same `model`."""
    info = info or DistInfo()
    out_dir = Path(out_dir)
    device = info.device
    log = log or (RunLog(out_dir, cfg.run.metrics_format, cfg.run.tensorboard, cfg.run.progress_bar,
                         log_every=cfg.run.log_every)
                  if info.is_main else RunLog.disabled())
    accum = cfg.optim.accumulation_steps
    if cfg.schedule.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.schedule.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1: the data yields no batch (check data.shards/batch_size)")
    updates_per_epoch = math.ceil(steps_per_epoch / accum)
    total_epochs = cfg.schedule.total_epochs

    # ---- phase 1: model on the device; optimizer, schedule, EMA and scaler from the unwrapped model ----
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    prefer_fastest_convolutions(device)  # drop-last batches: one shape per run
    model = model.to(device=device, memory_format=memory_format)
    global_batch = cfg.data.batch_size * info.world_size * accum
    optimizer = create_optimizer(model, cfg.optim, lr=cfg.optim.scaled_lr(global_batch))
    scheduler = create_scheduler(optimizer, cfg.schedule, updates_per_epoch)
    ema = (ModelEma(model, decay=cfg.run.ema_decay, use_warmup=cfg.run.ema_warmup)
           if cfg.run.ema_decay is not None else None)
    scaler = torch.amp.GradScaler(device.type) if cfg.run.amp == "fp16" else None  # bf16 needs no scaling
    state = TrainState()

    # ---- phase 2: resume (model, optimizer, scheduler, EMA, scaler, RNGs, epoch, data position) ----------
    if resume is not None:
        ckpt = load_checkpoint_file(resume)
        check_resume_fits(ckpt, arch=arch, config=cfg.to_dict(), data=data_identity, world_size=info.world_size,
                          source=str(resume))
        state = restore_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                   scaler=scaler, source=str(resume))
        log.message(f"resumed from {resume}: epoch {state.epoch}, update {state.global_update}, "
                    f"data position {state.data_position or 'start of epoch'}")
    scheduler.step_update(num_updates=state.global_update)

    # ---- phase 3: wrap for speed and for several processes --------------------------------------------
    if forward is not None and info.distributed:
        raise ValueError("train(forward=...) is for one process; under DDP the loop wraps the model itself")
    train_model = forward if forward is not None else wrap_ddp(TokenForward(model), info)  # both outputs
    if cfg.model.compile and forward is None:
        # Fixed shapes (the runners set data.drop_last with model.compile): one graph, no recompiles.
        train_model = compile_fixed_shapes(train_model, cfg.model.compile_mode)
    if cfg.model.compile:
        compute_loss = compile_loss(compute_loss)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or StopRequest()
    last_ckpt: Path | None = out_dir / LAST if (out_dir / LAST).exists() else None
    last_loss = float("nan")

    writer = CheckpointWriter()
    pauses: list[tuple[float, float]] = []

    def checkpoint(metrics: dict) -> Path | None:
        """Queue a copy of the state now, write it in the background (trainer/checkpoint_writer.py)."""
        start = time.perf_counter()
        if info.is_main:
            writer.submit(checkpoint_dict(
                model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler, state=state,
                config=cfg.to_dict(), arch=arch, metrics=metrics, data=data_identity, world_size=info.world_size),
                out_dir / LAST)
        barrier(info)
        pauses.append((start, time.perf_counter() - start))
        return out_dir / LAST

    def checkpoint_on_disk() -> None:
        """Wait for the write in flight, every rank with rank 0: a rank that exits first can make a launcher
        (torchrun) stop rank 0 in the middle of it."""
        try:
            writer.wait()
        finally:
            barrier(info)

    # ---- phase 4: epochs -------------------------------------------------------------------------------
    def non_finite(epoch: int, step: int, update: int) -> None:
        try:
            checkpoint_on_disk()  # the last good checkpoint, complete
        except TrainCheckpointError as e:  # the NaN is the news; the previous checkpoint is intact
            log.message(str(e))
        where = f"epoch {epoch}, step {step}, update {update}" if epoch >= 0 else "on another rank"
        log.record("stop", epoch=state.epoch, update=state.global_update, loss=float("nan"))
        log.message(f"loss is not finite at {where}; stopping. Last good checkpoint: {last_ckpt or 'none yet'}")
        log.close()
        raise NonFiniteLoss(
            f"training loss became NaN/inf at {where}; the last good "
            f"checkpoint is kept at {last_ckpt or '(none written yet)'}."
            " Lower optim.lr, set optim.clip_grad, or check the inputs/labels.")

    health = LossHealth(device, info, non_finite)
    step_mode = cfg.model.compile_mode if cfg.model.compile else "default"  # what begin_step marks each step for
    def optimizer_update(synced: bool) -> None:
        """Unscale, clip, step, EMA, schedule. `synced=False`: the last micro-batches ran under no_sync."""
        if not synced and info.distributed:  # an epoch's leftover accumulation: average grads by hand
            for p in model.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad, info).div_(info.world_size)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.optim.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_update += 1
        if ema is not None:
            ema.update(model, step=state.global_update)
        scheduler.step_update(num_updates=state.global_update)

    try:
        with stop:
            while state.epoch < total_epochs:
                train_model.train()
                step = int(state.data_position.get("steps", 0))
                batches = iter(epoch_batches(state.epoch, dict(state.data_position)))
                rank_position: dict | Callable[[], dict] = {}
                skipped, seen, pending, t0, last_terms = 0, 0, 0, time.perf_counter(), None
                optimizer.zero_grad(set_to_none=True)
                # The epoch runs until the data runs dry on any rank (every rank must take the same number of
                # steps for DDP's collectives), or to schedule.max_steps_per_epoch. steps_per_epoch (an
                # estimate from the sample count) only sizes the schedule and the progress bar.
                while cfg.schedule.max_steps_per_epoch is None or step < cfg.schedule.max_steps_per_epoch:
                    item = _next_or_none(batches)
                    if any_rank(info, item is None)[0]:  # a CPU all-reduce: no wait on the GPU
                        break
                    batch, rank_position = item
                    # Seed index unique per micro-batch whatever the (estimated) epoch length: epoch·2^24 + step.
                    # Everything drawn this step (targets, erasing, mixing, drop path) comes from (seed, rank, index).
                    seed_index = (state.epoch << 24) + step
                    seed_step(cfg.data.seed, info.rank, seed_index)
                    begin_step(step_mode)
                    images, cls_target, token_target = make_targets(batch, device, seed_index)
                    images = images.contiguous(memory_format=memory_format)
                    boundary = (pending + 1) % accum == 0
                    sync = nullcontext() if boundary or not info.distributed else train_model.no_sync()
                    with sync:
                        with amp_context(device, cfg.run.amp):
                            cls_logits, token_logits = split_outputs(train_model(images))
                        terms = compute_loss(cls_logits, token_logits, cls_target, token_target)
                        # NaN/inf: flagged on the device (no host sync here), read with the metrics below.
                        health.note(terms.total, state.epoch, step, state.global_update)
                        loss = terms.total / accum
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    step += 1
                    pending += 1
                    seen += images.shape[0]
                    last_terms = terms
                    if not boundary:
                        continue
                    optimizer_update(synced=True)
                    pending = 0

                    lr = optimizer.param_groups[0]["lr"]
                    rate = seen * info.world_size / max(time.perf_counter() - t0, 1e-9)
                    if state.global_update % cfg.run.log_every == 0:  # the only host reads of device values
                        health.check()
                        skipped = int(_position(rank_position).get("skipped", skipped))
                        last_loss = float(last_terms.total.detach())
                        log.record("train", epoch=state.epoch, update=state.global_update, loss=last_loss,
                                   loss_cls=float(last_terms.cls), loss_token=float(last_terms.token), lr=lr,
                                   images_per_s=round(rate, 2), skipped_samples=skipped)
                    log.progress(state.epoch, total_epochs, step, steps_per_epoch, last_loss, lr, rate)
                    stopping = any_rank(info, stop.requested)[0]  # agreed on a CPU group: no wait on the device
                    every = cfg.run.checkpoint_every
                    if stopping or (every is not None and state.global_update % every == 0):
                        # Mid-epoch: every rank's exact loader position (resume continues with the next batch);
                        # the loss health is read first so no checkpoint ever holds non-finite weights.
                        health.check()
                        last_loss = float(last_terms.total.detach())
                        state.data_position = {"steps": step, "ranks": gather_positions(_position(rank_position), info)}
                        last_ckpt = checkpoint({"loss": last_loss})
                    if stopping:
                        checkpoint_on_disk()  # before we say so
                        log.record("sigterm", epoch=state.epoch, update=state.global_update, loss=last_loss)
                        log.message(f"SIGTERM: checkpoint written to {last_ckpt} at epoch {state.epoch}, step {step}; "
                                    f"continue with --resume {last_ckpt}")
                        log.close()
                        return TrainResult("stopped", state.epoch, state.global_update, last_ckpt, None, last_loss,
                                           tuple(pauses), tuple(writer.writes))
                if pending:  # the epoch's last micro-batches still update (no sample's gradient is dropped)
                    optimizer_update(synced=accum == 1)
                health.check()
                if last_terms is not None:
                    last_loss = float(last_terms.total.detach())

                # -- end of epoch: the data position resets, a checkpoint is written --
                skipped = int(_position(rank_position).get("skipped", skipped))
                skipped, = sum_over_ranks(info, skipped)  # a host count: summed on the CPU group, not via the GPU
                log.record("epoch", epoch=state.epoch, update=state.global_update, loss=last_loss,
                           lr=optimizer.param_groups[0]["lr"], skipped_samples=skipped,
                           images_per_s=round(seen * info.world_size / max(time.perf_counter() - t0, 1e-9), 2))
                if skipped:
                    log.message(f"epoch {state.epoch}: {skipped} unreadable samples skipped (counted, see metrics)")
                state.epoch += 1
                state.data_position = {}
                last_ckpt = checkpoint({"loss": last_loss})
    finally:
        writer.wait()  # the last checkpoint is on disk before the loop returns or raises

    # ---- phase 5: the EMA export `stl-labels generate --checkpoint` loads -------------------------------
    export = export_for_labeling(last_ckpt, out_dir / EXPORT) if info.is_main and last_ckpt else None
    barrier(info)
    log.message(f"done: {state.epoch} epochs, {state.global_update} updates; checkpoint {last_ckpt}, export {export}")
    log.close()
    return TrainResult("finished", state.epoch, state.global_update, last_ckpt, export, last_loss, tuple(pauses),
                       tuple(writer.writes))
