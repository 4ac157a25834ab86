"""What a token model produces at an input size: parameters, token grid, prefix tokens, head mode,
and optionally measured forward / train-step time. `stl-labels models` prints them:

    stl-labels models --size 224 fan_tiny_8_p4_hybrid_token convnext_atto
    stl-labels models --size 64 --time --batch 8 fan_test_p4_hybrid_token
"""
from __future__ import annotations

import time

import torch

from labeler.models.token_model_factory import create_token_model, token_grid


def describe(name: str, hw: tuple[int, int], num_classes: int = 1000) -> dict:
    """Model name, input, token grid, token count, prefix tokens, token-head mode and parameter count."""
    model = create_token_model(name, num_classes=num_classes)
    gh, gw = token_grid(model, hw)
    return dict(model=name, input=f"{hw[0]}x{hw[1]}", grid=f"{gh}x{gw}", tokens=gh * gw,
                prefix_tokens=model.num_prefix_tokens,
                token_head=getattr(model, "token_head_mode", "aux_head"),
                params=sum(p.numel() for p in model.parameters()))


def measure(name: str, hw: tuple[int, int], batch: int, repeats: int, num_classes: int = 1000) -> dict:
    """Median seconds of an eval forward and of a train step (forward + backward + SGD) at `batch`."""
    torch.manual_seed(0)
    model = create_token_model(name, num_classes=num_classes)
    x = torch.randn(batch, 3, *hw)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def forward():
        with torch.no_grad():
            model.eval().forward_tokens(x)

    def train_step():
        cls_logits, token_logits = model.train().forward_tokens(x)
        (cls_logits.logsumexp(-1).mean() + token_logits.logsumexp(-1).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {}
    for label, fn in (("forward_s", forward), ("train_step_s", train_step)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[label] = sorted(times)[len(times) // 2]
    return out
