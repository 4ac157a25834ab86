"""What the labeling work unit keeps of one shard until its single store write: the samples table as the
decode chunks arrive (`ShardRows`) and the encoded teacher outputs as the device batches finish
(`ResultBuffers`). Nothing is written before the shard is complete, so a worker killed mid-shard leaves
nothing behind (docs/design.md, "The labeling work unit")."""
from __future__ import annotations

from typing import Any

import numpy as np

from labeler.decode_chunks import DecodedChunk
from labelstore import NUM_PARAMS, EncodedLogits


class ShardRows:
    """The samples table of one shard as the work unit fills it: keys, labels, sizes, fingerprints, validity, params, errors."""

    def __init__(self, n: int, s: int):
        self.keys, self.labels = [""] * n, np.full(n, -1, np.int32)
        self.image_hw, self.valid = np.zeros((n, 2), np.int32), np.zeros(n, bool)
        self.params = np.zeros((n, s, NUM_PARAMS), np.float32)
        self.fingerprints = np.zeros(n, np.uint64)  # of the encoded image bytes: inputs are checked against the store
        self.errors: list[dict[str, str]] = []
        self._seen: set[str] = set()

    def record(self, chunk: DecodedChunk) -> None:
        valid_at = 0
        for i, pos in enumerate(chunk.positions.tolist()):
            key = chunk.keys[i]
            if key in self._seen:  # keep the first one joinable by `__key__`; this row stays invalid
                key = f"{key}#duplicate-at-{pos}"
            self._seen.add(key)
            self.keys[pos], self.labels[pos] = key, chunk.labels[i]
            self.fingerprints[pos] = chunk.fingerprints[i]
            if chunk.errors[i] is not None:
                self.errors.append({"key": key, "reason": chunk.errors[i]})
            else:
                self.valid[pos], self.image_hw[pos] = True, chunk.image_hw[i]
                self.params[pos] = chunk.params[valid_at]
                valid_at += 1

    def invalidate(self, pos: int, reason: str) -> None:
        if self.valid[pos]:
            self.valid[pos] = False
            self.errors.append({"key": self.keys[pos], "reason": reason})


class ResultBuffers:
    """Encoded teacher outputs of a whole shard, filled batch by batch at flat (row * S + view) positions."""

    def __init__(self, n: int, s: int, spec: Any):
        self.n, self.s, self.dense = n, s, spec.topk == 0
        t, width = spec.num_tokens, (spec.num_classes if spec.topk == 0 else spec.topk)
        self.tok_logit = np.zeros((n * s, t, width), np.float16)
        self.cls_logit = np.zeros((n * s, width), np.float16)
        if not self.dense:
            # Invalid rows keep valid-looking fills (class ids 0..K-1, tail -inf): the store marks them invalid.
            ids = np.arange(spec.topk, dtype=spec.class_dtype)
            self.tok_cls = np.broadcast_to(ids, (n * s, t, spec.topk)).copy()
            self.cls_cls = np.broadcast_to(ids, (n * s, spec.topk)).copy()
            self.tok_tail = np.full((n * s, t), -np.inf, np.float16)
            self.cls_tail = np.full((n * s,), -np.inf, np.float16)

    def put(self, flat: np.ndarray, tokens: Any, cls: Any) -> None:
        self.tok_logit[flat], self.cls_logit[flat] = tokens.logit, cls.logit
        if not self.dense:
            self.tok_cls[flat], self.tok_tail[flat] = tokens.cls, tokens.tail_lse
            self.cls_cls[flat], self.cls_tail[flat] = cls.cls, cls.tail_lse

    @property
    def nbytes(self) -> int:
        arrays = [self.tok_logit, self.cls_logit] + ([] if self.dense else [self.tok_cls, self.cls_cls, self.tok_tail, self.cls_tail])
        return int(sum(a.nbytes for a in arrays))

    def encoded(self) -> tuple[Any, Any]:
        n, s = self.n, self.s
        shape = lambda a: a.reshape(n, s, *a.shape[1:])  # noqa: E731
        if self.dense:
            return EncodedLogits(shape(self.tok_logit)), EncodedLogits(shape(self.cls_logit))
        return (EncodedLogits(shape(self.tok_logit), shape(self.tok_cls), shape(self.tok_tail)),
                EncodedLogits(shape(self.cls_logit), shape(self.cls_cls), shape(self.cls_tail)))
