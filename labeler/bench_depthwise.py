"""`stl-labels bench depthwise`: the FAN depthwise branch compiled two ways on one model, inputs and settings.

"stencil" (the default) writes the branch's two depthwise 3x3 convolutions as shifted multiply-adds that
torch.compile fuses with the GELU, BatchNorm and residual around them; "conv" keeps the depthwise
convolutions (cuDNN's on a GPU), separate kernels (`labeler.models.fan_layers.set_depthwise_impl`). The
bench prints, for each, the compiled forward's views/s (the labeling teacher's call, eval mode) and, with a
training batch, the compiled forward + backward's images/s (a student step without the optimizer), and how
long each compiled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from labeler.bench_calls import synchronize, time_calls
from labeler.device import resolve_device
from labeler.models.fan_layers import DEPTHWISE_IMPLS, set_depthwise_impl
from labeler.models.token_model_factory import create_token_model

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DepthwiseFigures:
    model: str
    device: str
    amp: str
    input_size: int
    batch_size: int
    train_batch: int
    forward: dict = field(default_factory=dict)  # impl -> views/s of the compiled forward (eval)
    train: dict = field(default_factory=dict)  # impl -> images/s of the compiled forward + backward
    compile_seconds: dict = field(default_factory=dict)  # impl -> seconds of the warm-up calls (the compiles)

    def format(self) -> str:
        train_head = (f"forward + backward img/s (batch {self.train_batch})" if self.train_batch
                      else "forward + backward (--train-batch)")
        lines = [f"FAN depthwise branch under torch.compile: model {self.model}, device {self.device}, amp {self.amp}, "
                 f"input {self.input_size} px",
                 f"  {'impl':8s} {f'forward views/s (batch {self.batch_size})':>32s} "
                 f"{train_head:>40s} {'compile s':>10s}"]
        for impl in DEPTHWISE_IMPLS:
            train = f"{self.train[impl]:.1f}" if impl in self.train else "n/a"
            lines.append(f"  {impl:8s} {self.forward[impl]:32.1f} {train:>40s} {self.compile_seconds[impl]:10.1f}")
        ratio = [f"forward {self.forward['stencil'] / self.forward['conv']:.3f}"]
        if self.train:
            ratio.append(f"forward + backward {self.train['stencil'] / self.train['conv']:.3f}")
        lines.append("  stencil / conv: " + ", ".join(ratio))
        return "\n".join(lines)


def _timed(call, calls: int, device: torch.device) -> float:
    """Seconds per call, after two untimed calls (compile, autotune, allocator)."""
    return time_calls({"call": call}, device, repeats=calls, warmup=2)["call"][1] / 1e3


def bench_depthwise(model: str, batch_size: int = 256, amp: str = "bf16", input_size: int = 224,
                    device: str = "auto", batches: int = 20, train_batch: int = 0) -> DepthwiseFigures:
    """Compiled forward (and, with `train_batch` > 0, forward + backward) of `model` with each depthwise impl."""
    if amp not in _AMP:
        raise ValueError(f"bench depthwise: amp must be one of {tuple(_AMP)}, got {amp!r}")
    if batch_size < 1 or batches < 1 or train_batch < 0 or input_size < 16:
        raise ValueError("bench depthwise: --batch-size and --batches must be >= 1, --train-batch >= 0, "
                         "--input-size >= 16")
    dev = resolve_device(device)
    memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    dtype = _AMP[amp]
    forward, train, compile_s = {}, {}, {}
    for impl in DEPTHWISE_IMPLS:
        torch.manual_seed(0)
        net = create_token_model(model, num_classes=1000, pretrained=False, drop_path_rate=0.0)
        net = net.to(dev, memory_format=memory_format)
        set_depthwise_impl(net, impl)
        step = torch.compile(net.forward_tokens)  # a fresh model per impl: its own compiled code
        x = torch.randn(batch_size, 3, input_size, input_size, device=dev).contiguous(memory_format=memory_format)

        def infer() -> None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                step(x)

        net.eval()
        start = time.perf_counter()
        infer()
        synchronize(dev)
        compile_s[impl] = time.perf_counter() - start
        forward[impl] = batch_size / _timed(infer, batches, dev)
        if train_batch:
            net.train()
            xt = torch.randn(train_batch, 3, input_size, input_size, device=dev).contiguous(memory_format=memory_format)

            def learn() -> None:
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    cls, tokens = step(xt)
                (cls.float().mean() + tokens.float().mean()).backward()
                net.zero_grad(set_to_none=True)

            start = time.perf_counter()
            learn()
            synchronize(dev)
            compile_s[impl] += time.perf_counter() - start
            train[impl] = train_batch / _timed(learn, batches, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    return DepthwiseFigures(model=model, device=name, amp=amp, input_size=input_size, batch_size=batch_size,
                            train_batch=train_batch, forward=forward, train=train, compile_seconds=compile_s)
