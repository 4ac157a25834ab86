"""A batch's tensors in one shared-memory buffer: how a data worker hands a batch to the training process.

torch's DataLoader passes every tensor of a worker's batch as its own shared-memory handle: each one is
a round trip to the worker when the batch is unpickled (about 0.3–0.4 ms each on a busy host) and its
own page-locked copy in the pin thread. A student batch has a dozen tensors (labels, rows, token
logits, view params, photometric slots, ...), so that overhead alone is several milliseconds per step
in the main process. `pack_tensors` copies them, once, into one shared buffer (one handle, one pin);
`unpack_tensors` gives them back as views of it, with the dtypes and shapes they had.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from labeler.flat_images import shared_bytes

_ALIGN = 16  # every tensor starts on a 16-byte boundary, so its dtype view is aligned


@dataclass(frozen=True)
class PackedTensors:
    """Tensors back to back in `data` (1-D uint8); `layout`: (name, dtype, shape, byte offset, channels_last)
    of each (a channels-last 4-D tensor keeps its memory order: NHWC images stay NHWC)."""

    data: torch.Tensor
    layout: tuple[tuple[str, torch.dtype, tuple[int, ...], int, bool], ...]

    def pin_memory(self) -> "PackedTensors":
        """Page-locked copy (torch's DataLoader calls this on batch items when `pin_memory=True`)."""
        return PackedTensors(self.data.pin_memory(), self.layout)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, dtype, shape, offset, channels_last in self.layout:
            size = torch.Size(shape).numel() * dtype.itemsize
            flat = self.data[offset:offset + size].view(dtype)
            if channels_last:
                n, c, h, w = shape
                out[name] = flat.view(n, h, w, c).permute(0, 3, 1, 2)
            else:
                out[name] = flat.view(shape)
        return out


def pack_tensors(batch: dict, *, shared: bool = True) -> dict:
    """`batch` with its CPU tensors moved into one `PackedTensors` under the key "packed" (other values stay)."""
    names = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    if not names:
        return batch
    layout, offset = [], 0
    for name in names:
        t = batch[name]
        channels_last = t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        layout.append((name, t.dtype, tuple(t.shape), offset, channels_last))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    # In shared memory from the start: handing it to another process copies nothing.
    data = shared_bytes(offset) if shared else torch.empty(offset, dtype=torch.uint8)
    packed = PackedTensors(data, tuple(layout))
    for name, view in packed.tensors().items():
        view.copy_(batch[name])
    return {**{k: v for k, v in batch.items() if k not in names}, "packed": packed}


def unpack_tensors(batch: dict) -> dict:
    """The inverse of `pack_tensors` (in place; a batch without "packed" is returned as it is)."""
    packed = batch.pop("packed", None)
    if packed is not None:
        batch.update(packed.tensors())
    return batch
