"""`stl-train bench`: what stored token labels cost a student, measured, in one run on the same shards and model.

Training steps/s (forward + backward + AdamW step on batches already in memory, so only the step is timed):
  (a) no token labels: class target only (mixing and erasing as in training), Eq. 5 with β = 0;
  (b) stored token labels (ours): + Gumbel token targets drawn on the device from the stored top-k logits;
  (c) online teacher (the reference method): + a same-size teacher forward (eval, no grad) every step, its
      dense token logits turned into Gumbel token targets by the same sampler.
Data-loader images/s on the same shards: our replay path (decode → render the STORED view → photometric
RandAugment → collate) vs timm's standard train transform (`create_transform(is_training=True)`).
Nothing is asserted; the figures are printed with their ratios (goals: b/a ≥ 0.95, b/c ≥ 1.25 on a GPU,
replay/timm ≥ 1.0).
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass

import torch

from labeler.models import create_token_model, token_grid
from trainer.config import OptimConfig
from trainer.data_config import DataConfig, TokenLabelConfig
from trainer.distributed import resolve_device
from trainer.loader import build_labeler_loader, build_student_loader
from trainer.loop import amp_context
from trainer.losses import student_loss
from trainer.optim import create_optimizer
from trainer.target_builder import TargetBuilder
from trainer.token_targets import token_targets


@dataclass(frozen=True)
class BenchSettings:
    shards: tuple[str, ...]
    labels: str
    labeler: str
    model: str = "fan_test_p4_hybrid_token"
    steps: int = 20
    warmup: int = 3
    batch_size: int = 16
    workers: int = 0
    device: str = "auto"
    amp: str = "none"
    seed: int = 0
    repeats: int = 3  # variants run interleaved this many times; the median is reported (shared machines drift)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("bench: give --shards (the shards labelled in --labels)")
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1 or self.workers < 0 or self.repeats < 1:
            raise ValueError("bench: steps and batch size must be >= 1, warmup and workers >= 0")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"bench: amp must be none, bf16 or fp16, got {self.amp!r}")


@dataclass(frozen=True)
class BenchFigures:
    device: str
    model: str
    batch_size: int
    repeats: int
    steps_per_s: dict  # variant -> steps/s
    loader_images_per_s: dict  # "replay" / "timm" -> images/s
    loader_images: int

    def ratios(self) -> dict:
        s, l = self.steps_per_s, self.loader_images_per_s
        return {"b/a (stored vs none)": s["b_stored"] / s["a_none"],
                "b/c (stored vs online teacher)": s["b_stored"] / s["c_online"],
                "replay/timm (loader)": l["replay"] / l["timm"]}

    def table(self) -> str:
        lines = [f"stl-train bench: {self.model}, batch {self.batch_size}, device {self.device}, "
                 f"median of {self.repeats} interleaved runs"]
        names = {"a_none": "(a) no token labels", "b_stored": "(b) stored token labels",
                 "c_online": "(c) online teacher"}
        for k, v in self.steps_per_s.items():
            lines.append(f"  {names[k]:<28} {v:8.2f} steps/s  ({v * self.batch_size:8.1f} img/s)")
        for k, v in self.loader_images_per_s.items():
            label = "replay loader (ours)" if k == "replay" else "timm train transform"
            lines.append(f"  {label:<28} {v:8.1f} images/s  ({self.loader_images} images per run)")
        for k, v in self.ratios().items():
            lines.append(f"  ratio {k:<30} {v:6.3f}")
        return "\n".join(lines)


def _time_loader(loader, max_images: int) -> tuple[float, int]:
    loader.set_epoch(0)
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["image"])
        if n >= max_images:
            break
    return n / max(time.perf_counter() - start, 1e-9), n


def run_bench(s: BenchSettings) -> BenchFigures:
    device = resolve_device(s.device)
    # The default RandAugment (the paper's m9 mstd0.5) for both loaders, so they run the same colour ops.
    data = DataConfig(shards=s.shards, batch_size=s.batch_size, workers=s.workers, seed=s.seed, drop_last=True)
    tokens = TokenLabelConfig()
    loader = build_student_loader(data, labels=s.labels, labeler=s.labeler, rank=0, world_size=1)
    num_classes, hw = loader.num_classes, loader.input_size

    # ---- data-loader comparison: our replay path vs timm's standard train transform, same shards ----
    want = max(s.batch_size * (s.steps + s.warmup), 4 * s.batch_size)
    timm_loader = build_labeler_loader(dataclasses.replace(data, input_size=hw), rank=0, world_size=1)
    _time_loader(loader, s.batch_size)  # warm the page cache and imports for both
    loader_runs = {"replay": [], "timm": []}
    for _ in range(s.repeats):
        for name, ld in (("replay", loader), ("timm", timm_loader)):
            rate, n_images = _time_loader(ld, want)
            loader_runs[name].append(rate)
    replay_rate, timm_rate = (sorted(r)[len(r) // 2] for r in loader_runs.values())

    # ---- training steps on batches held in memory (the data path is timed above) ----
    batches, need = [], s.steps + s.warmup
    while len(batches) < need:
        before = len(batches)
        loader.set_epoch(len(batches))
        batches.extend(b for _, b in zip(range(need - len(batches)), loader))
        if len(batches) == before:
            raise ValueError("bench: the shards yield no full batch; lower --batch-size")

    def steps_per_s(variant: str) -> float:
        torch.manual_seed(s.seed)
        model = create_token_model(s.model, num_classes=num_classes).to(device).train()
        opt = create_optimizer(model, OptimConfig(), lr=1e-4)
        teacher = None
        if variant == "c_online":
            teacher = create_token_model(s.model, num_classes=num_classes).to(device).eval()
        builder = TargetBuilder(num_classes=num_classes, data=data, tokens=tokens if variant == "b_stored" else None,
                                store_grid=loader.store_grid, student_grid=token_grid(model, hw), device=device)
        gen = torch.Generator(device=device).manual_seed(s.seed)
        start = 0.0
        for i, batch in enumerate(batches):
            if i == s.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            if variant == "a_none":
                batch = {k: v for k, v in batch.items() if not k.startswith("token_")}
            images, cls_target, token_target = builder(batch, i)
            if teacher is not None:
                with torch.no_grad(), amp_context(device, s.amp):
                    _, teacher_tokens = teacher.forward_tokens(images)
                token_target = token_targets(teacher_tokens.float(), None, None, num_classes=num_classes, cfg=tokens,
                                             src_grid=token_grid(teacher, hw), generator=gen)
            with amp_context(device, s.amp):
                cls_logits, token_logits = model.forward_tokens(images)
            loss = student_loss(cls_logits, token_logits, cls_target, token_target, beta=1.0).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return s.steps / (time.perf_counter() - start)

    variants = ("a_none", "b_stored", "c_online")
    runs = {v: [] for v in variants}
    for _ in range(s.repeats):  # interleaved, so a slow spell on a shared machine hits every variant
        for v in variants:
            runs[v].append(steps_per_s(v))
    rates = {v: sorted(r)[len(r) // 2] for v, r in runs.items()}
    where = f"{device} ({platform.processor() or platform.machine()})" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)
    return BenchFigures(device=where, model=s.model, batch_size=s.batch_size, repeats=s.repeats, steps_per_s=rates,
                        loader_images_per_s={"replay": replay_rate, "timm": timm_rate}, loader_images=n_images)
