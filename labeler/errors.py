"""The labeler's errors: catch `LabelerError` for anything a user can fix about a teacher or its device.

Every message names the file or setting involved.
"""
from __future__ import annotations


class LabelerError(Exception):
    """Base class of every labeler error."""


class CheckpointError(LabelerError, ValueError):
    """Teacher weights that cannot be read or do not fit the model; the message names the file."""


class DeviceError(LabelerError, ValueError):
    """A device setting that this machine cannot satisfy (e.g. cuda without a GPU)."""
