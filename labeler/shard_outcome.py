"""What happened to one shard of a labeling job: returned by the work unit, summarised by the job."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ShardOutcome:
    """What happened to one shard (returned by workers, summarised by the job)."""

    shard_index: int
    url: str
    ok: bool
    num_samples: int = 0
    num_invalid: int = 0
    views: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    error: str | None = None
