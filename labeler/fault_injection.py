"""A test switch for the labeling job's retries: kill a worker process once, mid-shard, from the environment."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FaultInjection:
    """Test switch: kill this worker process (SIGKILL) once, after `kill_after` samples, unless `marker` exists."""

    kill_after: int
    marker: str

    @classmethod
    def from_env(cls) -> "FaultInjection | None":
        """`STL_FAULT_KILL_AFTER=<n samples>` and `STL_FAULT_MARKER=<file>` (the marker makes it fire once)."""
        after = os.environ.get("STL_FAULT_KILL_AFTER")
        if not after:
            return None
        marker = os.environ.get("STL_FAULT_MARKER")
        if not marker:
            raise ValueError("STL_FAULT_KILL_AFTER needs STL_FAULT_MARKER=<file> so the kill happens only once")
        return cls(int(after), marker)

    def tick(self, samples_done: int) -> None:
        if samples_done >= self.kill_after and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed pid {os.getpid()} after {samples_done} samples\n")
            os.kill(os.getpid(), signal.SIGKILL)
