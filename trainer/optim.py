"""Optimiser and learning-rate schedule: timm's factories with the paper's settings.

AdamW with no weight decay on norms, biases, the class token and the positional encoding; timm's cosine
schedule with timm's defaults (warmup inside `epochs`, cool-down after), stepped every optimiser update,
not every epoch (docs/design.md "Library behaviour").
"""
from __future__ import annotations

import inspect

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.optim._param_groups import param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from trainer.config import OptimConfig, ScheduleConfig
from trainer.errors import TrainConfigError

# Parameters that are embeddings, not weights: decaying them towards 0 only hurts (fnmatch patterns, so
# they also match inside a wrapper such as TokenHeadWrapper's `model.` prefix).
ALWAYS_NO_DECAY = ("cls_token", "*.cls_token", "pos_embed", "pos_embed.*", "*.pos_embed", "*.pos_embed.*")


def no_weight_decay_patterns(model: torch.nn.Module) -> set[str]:
    """The model's own `no_weight_decay()` names plus the class token and positional-encoding patterns."""
    own = getattr(model, "no_weight_decay", lambda: set())()
    return set(own) | set(ALWAYS_NO_DECAY)


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over two groups: decayed weights, and non-decayed 1-D params/biases/cls token/pos embedding.

    Build it from the unwrapped model (before DDP), whose parameter names are the ones listed above.
    """
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_weight_decay_patterns(model))
    extra = {"fused": True} if use_fused(model, cfg) else {}
    return create_optimizer_v2(groups, cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                               betas=tuple(cfg.betas), eps=cfg.eps, **extra)


def use_fused(model: torch.nn.Module, cfg: OptimConfig) -> bool:
    """Whether to ask torch for its fused optimiser step (`optim.fused`; None = where it is on offer).

    timm's factory passes `fused` on to torch's AdamW / Adam / SGD; on a GPU their fused step is one kernel
    per parameter chunk instead of the foreach implementation's several passes over the optimiser state."""
    if cfg.fused is False or (cfg.fused is None and not all(p.is_cuda for p in model.parameters())):
        return False
    supported = "fused" in inspect.signature(get_optimizer_class(cfg.name)).parameters
    if cfg.fused and not supported:
        raise TrainConfigError(f"optim.fused=true: optimiser {cfg.name!r} has no fused implementation "
                               f"(torch's adamw, adam and sgd have); set optim.fused=null")
    return supported


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, updates_per_epoch: int) -> Scheduler:
    """Cosine over `epochs` (its first `warmup_epochs` a linear warmup), then `cooldown_epochs` at min_lr, as
    timm's train script builds it; per-update steps.

    Call `scheduler.step_update(num_updates=global_update)` after every optimiser step (and once with 0
    before the first) so the lr is a function of the update count only: that is what makes resume exact.
    """
    if updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch}")
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, warmup_prefix=False, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    return scheduler
