"""Print what a token model produces at an input size: parameters, token grid, prefix tokens, head mode,
and optionally measured forward / train-step time.

    python -m labeler.models.describe --size 224 fan_tiny_8_p4_hybrid_token convnext_atto
    python -m labeler.models.describe --size 64 --time --batch 8 fan_test_p4_hybrid_token
"""
from __future__ import annotations

import argparse
import time

import torch

from labeler.models.token_model_factory import create_token_model, token_grid


def describe(name: str, hw: tuple[int, int], num_classes: int = 1000) -> dict:
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
            model.eval()(x)

    def train_step():
        cls_logits, token_logits = model.train()(x)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="FAN *_token names or any timm model name")
    parser.add_argument("--size", default="224", help="input size: S (square) or HxW, e.g. 96x80")
    parser.add_argument("--time", action="store_true", help="also measure forward and train-step time")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        sides = [int(v) for v in args.size.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        parser.error(f"--size must be S or HxW, got {args.size!r}")
    hw = (sides[0], sides[-1])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.models:
        row = describe(name, hw)
        if args.time:
            timings = measure(name, hw, args.batch, args.repeats)
            row.update(batch=args.batch, **{k: f"{v:.4f}" for k, v in timings.items()})
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
