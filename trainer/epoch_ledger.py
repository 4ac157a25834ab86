"""Per-worker bookkeeping of one epoch: which shards are fully consumed, which samples were skipped.

A shard is *done* when its tar has been read to the end, its sample count is final (checked
against the store's keys where there is a store) and every sample that came out of it has left the
pipeline (in a batch, or skipped with a reason); skipped samples are counted, never dropped
silently. Data-path steps record into the ledger; the batcher drains it into each batch's `meta`,
and the loader in the main process sums it up over workers.

The exact resume position is `streamed`: how many samples this worker's stream has handed on after
its shuffle (the last order-changing step). The stream before that point is a pure function of
(seed, epoch, rank, worker), so a resumed worker replays it up to `resume_from` without decoding
or rendering (`skip_consumed`) and goes on with exactly the samples an uninterrupted run would.
"""
from __future__ import annotations

from collections import defaultdict


class EpochLedger:
    def __init__(self):
        self._entered: dict[int, int] = defaultdict(int)
        self._left: dict[int, int] = defaultdict(int)
        self._urls: dict[int, str] = {}
        self._closed: set[int] = set()
        self._finished: set[int] = set()
        self._reported: set[int] = set()
        self._skips: list[dict] = []
        self.seen_keys: dict[int, set] = defaultdict(set)
        self.streamed = 0  # samples handed on after the shuffle, this epoch (the resume position)
        self.resume_from = 0  # samples a checkpoint says were already consumed: skipped without decoding

    # --- data-path steps record ----------------------------------------------------------------
    def opened(self, pos: int, url: str) -> None:
        """Shard `pos` (its index in the epoch's shard order) starts being read."""
        self._urls[pos] = url
        self._entered[pos] += 0

    def closed(self, pos: int) -> None:
        """Shard `pos`'s tar has been read to its end (or given up on)."""
        self._closed.add(pos)

    def closed_unfinished(self, before: int | None = None) -> list[tuple[int, str]]:
        """Closed shards whose sample count is not final yet; with `before`, only those earlier in the
        epoch's order than the shard now streaming (a worker reads its shards in that order)."""
        return [(p, self._urls[p]) for p in sorted(self._closed - self._finished) if before is None or p < before]

    def finished(self, pos: int) -> None:
        """Every sample of shard `pos` has entered (or been recorded missing): its count is final."""
        self._finished.add(pos)

    def entered(self, pos: int, key: str) -> None:
        self._entered[pos] += 1
        self.seen_keys[pos].add(key)

    def left(self, pos: int) -> None:
        self._left[pos] += 1

    def skip(self, pos: int, url: str, key: str, reason: str, *, entered: bool = True) -> None:
        """A sample leaves the pipeline without reaching a batch; `entered=False` for one never counted in."""
        self._skips.append({"url": url, "key": key, "reason": reason})
        if entered:
            self._left[pos] += 1

    # --- the batcher drains -------------------------------------------------------------------
    def drain(self) -> dict:
        """Shards newly done and samples newly skipped since the last drain."""
        done = sorted(p for p in self._finished - self._reported if self._entered[p] == self._left[p])
        self._reported.update(done)
        skips, self._skips = self._skips, []
        return {"done_shards": done, "skipped": skips, "streamed": self.streamed}


def skip_consumed(samples, ledger: EpochLedger):
    """Count samples past the shuffle; drop the first `ledger.resume_from` (trained on before the checkpoint).

    Sits right after the shuffle and before decoding, so a resume costs tar + label reads of the
    consumed part, not its decode and render.
    """
    for s in samples:
        ledger.streamed += 1
        if ledger.streamed <= ledger.resume_from:
            ledger.left(s["__pos__"])
            continue
        yield s
