"""Shard leases: several `generate` drivers on one store label each shard once.

A driver claims a shard before labelling it: under the store lock it checks the shard is not done and
holds no live lease of another driver, then writes `<store>/.leases/<labeler>/<shard>.json` with its
owner id and an expiry. While labelling it renews its leases (a heartbeat); when the shard is written (or
fails) it releases it. A driver that dies stops renewing, its leases expire after `ttl_s`, and another
driver takes those shards. Leases live beside the Zarr data, not in its metadata, so they never touch
what readers see. Only local stores have them (the store lock is an flock); on an object store `claim`
always succeeds and one driver per store must be arranged outside (docs/store-format.md).
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from .store_lock import local_path, store_lock

DEFAULT_TTL_S = 300.0  # a driver renews every ttl/3; a dead driver's shards are free again after this


def new_owner_id() -> str:
    """host:pid:random — unique per driver run, readable in a lease file."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ShardLeases:
    """The leases one driver (`owner`) holds on one labeler's shards."""

    def __init__(self, labels: Any, owner: str | None = None, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl_s}")
        self.labels, self.owner, self.ttl_s = labels, owner or new_owner_id(), float(ttl_s)
        self.store_path = labels.store.path
        local = local_path(self.store_path)
        self.dir = None if local is None else os.path.join(local, ".leases", labels.name)
        self.held: set[int] = set()

    def _file(self, shard_index: int) -> str:
        return os.path.join(self.dir, f"{int(shard_index)}.json")

    def holder(self, shard_index: int, now: float | None = None) -> str | None:
        """Owner of a live lease on the shard, or None."""
        if self.dir is None:
            return None
        try:
            with open(self._file(shard_index)) as f:
                lease = json.load(f)
        except (OSError, ValueError):
            return None
        return lease.get("owner") if float(lease.get("expires", 0)) > (time.time() if now is None else now) else None

    def claim(self, shard_index: int) -> bool:
        """Take the shard if it is not done and nobody else holds a live lease on it."""
        if self.dir is None:
            self.held.add(int(shard_index))
            return True
        with store_lock(self.store_path):
            self.labels._done_cache = None
            if self.labels.done_mask()[int(shard_index)]:
                return False
            other = self.holder(shard_index)
            if other is not None and other != self.owner:
                return False
            self._write(shard_index)
        self.held.add(int(shard_index))
        return True

    def _write(self, shard_index: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._file(shard_index) + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"owner": self.owner, "expires": time.time() + self.ttl_s}, f)
        os.replace(tmp, self._file(shard_index))

    def renew(self) -> None:
        """Push back the expiry of every lease held (the heartbeat; call more often than ttl_s)."""
        if self.dir is None:
            return
        with store_lock(self.store_path):
            for i in sorted(self.held):
                if self.holder(i) in (None, self.owner):
                    self._write(i)

    def release(self, shard_index: int) -> None:
        self.held.discard(int(shard_index))
        if self.dir is None:
            return
        with store_lock(self.store_path):
            if self.holder(shard_index) == self.owner:
                os.remove(self._file(shard_index))

    def release_all(self) -> None:
        for i in sorted(self.held):
            self.release(i)
