"""Is a streamed image the one that was labelled? The stored view params are crop boxes in the labelled
image's pixels, so a resized or replaced image would silently train on the wrong region.

Each sample is compared with its row: the decoded size against `image_hw`, and the encoded bytes'
`image_fingerprint` against the stored fingerprint where the store has one (0 = none recorded: not
checked). A mismatch is a skipped row with its reason in the ledger; when most rows of a shard differ,
the shards changed since labelling and the run stops with one line naming the shard.
"""
from __future__ import annotations

from labelstore.shard_format import image_fingerprint
from trainer.errors import ShardsChanged


class SourceCheck:
    """Per-worker check of streamed images against their stored rows (picklable). The rows' `image_hw` and
    fingerprints come with the shard's `ShardRows`, which the key join has already read."""

    def __init__(self, index):
        self.index = index
        self._mismatched: dict[int, int] = {}

    def mismatch(self, rows, row: int, data: bytes, decoded_hw: tuple[int, int]) -> str | None:
        """Why this sample is not the labelled image (None: it is, as far as the store can tell)."""
        i = row - rows.first_row
        stored_hw = tuple(int(v) for v in rows.image_hw[i])
        if stored_hw != tuple(decoded_hw):
            return (f"image is {decoded_hw[0]}x{decoded_hw[1]} (h x w) but was labelled at "
                    f"{stored_hw[0]}x{stored_hw[1]}: it changed since labelling")
        stored = rows.fingerprint(row)  # 0: none recorded (schema-1 store), checked by size only
        if stored != 0 and stored != image_fingerprint(data):
            return "image bytes differ from those labelled (fingerprint): it changed since labelling"
        return None

    def __call__(self, sample: dict, data: bytes, decoded_hw: tuple[int, int]) -> str | None:
        """The skip reason for a streamed sample (`__url__`, `__key__`, `__row__`), counted; None if it fits."""
        rows = self.index.shard_rows(sample["__url__"])
        reason = self.mismatch(rows, sample["__row__"], data, decoded_hw)
        if reason is not None:
            self.record(rows, sample["__url__"], sample["__key__"], reason)
        return reason

    def record(self, rows, url: str, key: str, reason: str) -> None:
        """Count a mismatch; most of a shard's rows differing means the shards themselves changed."""
        n = self._mismatched.get(rows.shard_index, 0) + 1
        self._mismatched[rows.shard_index] = n
        if n > rows.num_samples // 2:
            raise ShardsChanged(f"shard {url!r}: {n} of its {rows.num_samples} images differ from the ones "
                                f"labelled (e.g. key {key!r}: {reason}); the shards changed since labelling: "
                                f"relabel them with `stl-labels generate` or train on the labelled shards")
