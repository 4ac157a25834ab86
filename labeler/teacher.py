"""Teacher inference: a batch of rendered views → encoded top-k token and class logits.

A callable class (load once in `__init__`, one batch per `__call__`), so it runs the same inside a
Ray actor and in a plain test. The top-k and the log-sum-exp of the tail are computed on the device,
so only K values + one float per token cross to the host (docs/design.md "Store layout").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from labeler.cuda_graph import GraphedFunction
from labeler.device import prefer_fastest_convolutions, to_host_async
from labelstore import EncodedLogits, class_id_dtype

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_CHOICES = ("auto", "true", "false")  # the `compile`, `cuda_graph` and `channels_last` settings: auto = on CUDA


def _on_cuda_by_default(name: str, setting: bool | str, device: torch.device) -> bool:
    value = str(setting).lower()
    if value not in AUTO_CHOICES:
        raise ValueError(f"{name} must be one of {AUTO_CHOICES} (or a bool), got {setting!r}")
    return device.type == "cuda" if value == "auto" else value == "true"


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """`compile` setting → whether to torch.compile: auto = on CUDA only (compiling pays off on a GPU)."""
    return _on_cuda_by_default("compile", setting, device)


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """`channels_last` setting → whether the teacher (weights and input) uses channels-last memory: auto = on CUDA,
    where the hybrid stem's convolutions run on tensor cores in that layout (the student's default too)."""
    return _on_cuda_by_default("channels_last", setting, device)


def resolve_cuda_graph(setting: bool | str, device: torch.device) -> bool:
    """`cuda_graph` setting → whether the teacher's batch runs as one captured CUDA graph: auto = on CUDA."""
    graphed = _on_cuda_by_default("cuda_graph", setting, device)
    if graphed and device.type != "cuda":
        raise ValueError(f"cuda_graph true needs a CUDA device, the teacher runs on {device}")
    return graphed


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, class ids, tail log-sum-exp) of the top `k` logits along the last axis, in float32.

    tail = log Σ exp(logit) over the classes outside the top-k (−inf when k = C), so exact top-k
    log-probabilities are `value − logaddexp(lse(values), tail)`.
    """
    # Top-k in the logits' own dtype (bf16 under autocast): the cast to float32 is exact and keeps the order,
    # so it picks the same values while reading half the bytes.
    values, ids = logits.topk(k, dim=-1, largest=True, sorted=True)
    tail = logits.float().scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    return values.float(), ids, tail


class HostCopy:
    """Device tensors on their way to page-locked host memory; `wait()` → `EncodedLogits` (numpy).

    The copies are queued (non_blocking) behind the work that made them and an event marks their end,
    so the caller can queue the next batch before waiting. On CPU they are plain copies.
    """

    def __init__(self, tensors: tuple[torch.Tensor | None, ...]):
        pin = any(t is not None and t.device.type == "cuda" for t in tensors)
        self._host = tuple(None if t is None else to_host_async(t) for t in tensors)
        self._event = None
        if pin:
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> EncodedLogits:
        if self._event is not None:
            self._event.synchronize()
        logit, cls, tail = (None if t is None else t.numpy() for t in self._host)
        return EncodedLogits(logit=logit, cls=cls, tail_lse=tail)


class Teacher:
    """Frozen token-labeler in eval mode: uint8 views (N, 3, h, w) → (tokens, cls) `EncodedLogits`.

    Calls `model.forward_tokens(x) -> (cls_logits (N, C), token_logits (N, T, C))` (labeler.models
    contract). BatchNorm lives inside FAN blocks, so eval mode is not optional. With `compile` the
    forward is `torch.compile`d once; callers keep the batch shape fixed (pad the last batch) so it
    compiles once; the normalisation and the top-k + tail are then compiled too (one fused pass over their
    tensor each instead of several). With `cuda_graph` (auto: on CUDA) `encode_views_async` runs a batch's whole
    device work (normalise, forward, top-k and tail) as one CUDA graph, captured on the first batch for that one
    shape. With `channels_last` (auto: on CUDA) weights and input use channels-last memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        topk: int,
        device: torch.device | str = "cpu",
        amp: str = "none",
        compile: bool | str = False,
        cuda_graph: bool | str = False,
        channels_last: bool | str = False,
    ):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if topk < 0:
            raise ValueError(f"topk must be >= 0 (0 = dense logits), got {topk}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got mean={mean} std={std}")
        self.device = torch.device(device)
        prefer_fastest_convolutions(self.device)  # one batch shape: the hybrid stem's convolutions are timed once
        self.channels_last = resolve_channels_last(channels_last, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.eval().requires_grad_(False).to(self.device, memory_format=self.memory_format)
        self.compiled = resolve_compile(compile, self.device)
        self.forward_fn = (torch.compile(self.model.forward_tokens, dynamic=False) if self.compiled
                           else self.model.forward_tokens)
        self.topk = int(topk)
        self.amp = amp
        # Compiled, the input's normalisation is one pass writing the autocast dtype (the stem's convolution
        # would cast it anyway), and the float32 copy, -inf scatter and log-sum-exp of the tail fuse (eagerly
        # each is a pass over the (N, T, C) logits).
        compile_small = (lambda fn: torch.compile(fn, dynamic=False)) if self.compiled else (lambda fn: fn)
        self._input_fn = compile_small(self._model_input)
        self._encode_fn = compile_small(self._encode)
        self.graphed = (GraphedFunction(self.encode_views_on_device) if resolve_cuda_graph(cuda_graph, self.device)
                        else None)
        # Normalise in 0..255 units so uint8 views go straight in: (x/255 − mean)/std.
        self._scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, 3, 1, 1).to(self.device)
        self._shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1).to(self.device)

    def _views(self, views: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(views).to(self.device, non_blocking=True)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Teacher expects uint8 views (N, 3, h, w), got {tuple(x.shape)} {x.dtype}")
        return x

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=torch.float32, memory_format=self.memory_format).mul_(self._scale).sub_(self._shift)

    def normalize(self, views: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (N, 3, h, w) → float32 (N, 3, h, w) normalised, on the teacher's device, in its memory format."""
        return self._normalized(self._views(views))

    def _model_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 views → the model's input: normalised in float32, then in the autocast dtype (what autocast hands
        the stem's convolution anyway), in the teacher's memory format."""
        return self._normalized(x).to(AMP_DTYPES[self.amp] or torch.float32)

    def _logits(self, views: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls (N, C), tokens (N, T, C)) logits in the autocast dtype."""
        x = self._input_fn(self._views(views))
        dtype = AMP_DTYPES[self.amp]
        with torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.forward_fn(x)

    @torch.inference_mode()
    def forward(self, views: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw logits on the device: (cls (N, C), tokens (N, T, C)), float32."""
        cls_logits, token_logits = self._logits(views)
        return cls_logits.float(), token_logits.float()

    def _encode(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.topk == 0:
            return logits.half(), None, None
        values, ids, tail = topk_with_tail(logits, self.topk)
        id_dtype = torch.int16 if class_id_dtype(logits.shape[-1]) == np.int16 else torch.int32
        return values.half(), ids.to(id_dtype), tail.half()

    @torch.inference_mode()
    def encode_on_device(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Device logits (..., C) → (values float16, class ids, tail float16) still on the device (dense: ids/tail None)."""
        if self.topk > logits.shape[-1]:
            raise ValueError(f"topk={self.topk} exceeds the teacher's {logits.shape[-1]} classes")
        return self._encode_fn(logits)

    @torch.inference_mode()
    def encode_async(self, logits: torch.Tensor) -> HostCopy:
        """Top-k + tail on the device, then an asynchronous copy to the host (`.wait()` gives EncodedLogits)."""
        return HostCopy(self.encode_on_device(logits))

    @torch.inference_mode()
    def encode_views_on_device(self, views: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """uint8 views → (token values, ids, tail, class values, ids, tail) on the device: a batch's device work,
        kernel by kernel (what `encode_views_async` replays as one CUDA graph when captured)."""
        cls_logits, token_logits = self._logits(views)  # in the autocast dtype: the top-k reads them once
        return (*self.encode_on_device(token_logits), *self.encode_on_device(cls_logits))

    @torch.inference_mode()
    def encode_views_async(self, views: torch.Tensor | np.ndarray) -> tuple[HostCopy, HostCopy]:
        """uint8 views (N, 3, h, w) → (tokens, cls) on their way to the host (`.wait()` each): one graph launch
        when captured, else forward + top-k launched kernel by kernel."""
        x = torch.as_tensor(views).to(self.device, non_blocking=True)
        out = self.graphed(x) if self.graphed is not None else self.encode_views_on_device(x)
        # Queued behind the work on this stream: the copies read the graph's outputs before its next replay.
        return HostCopy(out[:3]), HostCopy(out[3:])

    def encode(self, logits: torch.Tensor) -> EncodedLogits:
        """Device logits (..., C) → `labelstore.EncodedLogits` on the host (float16 values)."""
        return self.encode_async(logits).wait()

    def __call__(self, views: torch.Tensor | np.ndarray):
        """uint8 views (N, 3, h, w) → (tokens EncodedLogits (N, T, ·), cls EncodedLogits (N, ·))."""
        tokens, cls = self.encode_views_async(views)
        return tokens.wait(), cls.wait()
