"""A tiny learnable task for loop tests: which 8×8 patches of a 16×16 image are bright.

Class target = the number of bright patches (0..4, 5 classes); token target = per-patch bright (class 1) or
dark (class 0) padded to 5 classes. Batches are a pure function of (seed, epoch, shard), so a resumed run
sees exactly the batches an uninterrupted one does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 5


class ToyTokenModel(nn.Module):
    """Patch-embed 8×8 → 4 tokens → token head on each, class head on their mean (a FAN-shaped interface)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)  # consumes RNG: resume must restore it
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, NUM_CLASSES)
        self.aux_head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.forward_tokens(x)[0]

    def forward_tokens(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 4, dim)
        t = self.drop(F.gelu(self.mix(self.norm(t)))) + t
        return self.head(t.mean(1) + self.cls_token[:, 0]), self.aux_head(t)


class ToySource:
    """`shards` shards of one batch each; the data position is the number of shards done in the epoch."""

    def __init__(self, shards: int = 4, batch: int = 16, seed: int = 0):
        self.shards, self.batch, self.seed = shards, batch, seed

    def make_batch(self, epoch: int, shard: int):
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch * 1009 + shard)
        bright = torch.rand(self.batch, 2, 2, generator=g) < 0.5
        img = bright.float().repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 3, -1, -1)
        img = img + 0.1 * torch.randn(self.batch, 3, 16, 16, generator=g)
        return {"image": img, "label": bright.flatten(1).sum(1), "tokens": bright.flatten(1).long()}

    def epoch_batches(self, epoch: int, position: dict):
        start = position["ranks"][0]["shards_done"] if position else 0
        for shard in range(start, self.shards):
            yield self.make_batch(epoch, shard), {"shards_done": shard + 1}


def smooth(labels: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return F.one_hot(labels, NUM_CLASSES).float() * (1 - eps) + eps / NUM_CLASSES


def make_targets(batch, device, step):
    return batch["image"].to(device), smooth(batch["label"]).to(device), smooth(batch["tokens"]).to(device)
