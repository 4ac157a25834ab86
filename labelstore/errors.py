"""One exception hierarchy for everything that can go wrong with a label store.

Callers catch `StoreError` to handle any store problem; the subclasses say which kind, and every
message names the store path, array, shard, key or setting involved.
"""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every label-store error."""


class SchemaMismatch(StoreError):
    """The store (or a labeler in it) differs from what the caller expects; the message is a diff."""


class MissingRow(SchemaMismatch):
    """A sample's key is not among the stored rows of its shard (the shards differ from the labelled ones)."""


class StoreCorrupt(StoreError):
    """The store's own metadata or arrays are inconsistent (not the caller's fault)."""


class InvalidLabels(StoreError):
    """Data handed to a writer is malformed: wrong shape, NaN/inf, class id out of range, ..."""


class ShardCapacityError(InvalidLabels):
    """A shard was given more rows than were registered for it."""


class ShardConflict(StoreError):
    """A shard is registered or written twice with different contents."""


class ViewSpecError(StoreError, ValueError):
    """A ViewSpec setting or a view-params record is invalid."""


class ImageDecodeError(StoreError):
    """An image's bytes cannot be decoded; the message names the sample."""
