"""The trainer's errors: catch `TrainerError` for anything a user can fix in a training run.

Every message names the setting, file or step involved.
"""
from __future__ import annotations


class TrainerError(Exception):
    """Base class of every trainer error."""


class TrainConfigError(TrainerError, ValueError):
    """A training setting is invalid; the message names the key (e.g. `optim.lr`)."""


class TrainCheckpointError(TrainerError):
    """A training checkpoint is missing, unreadable or does not fit the run; the message names the file."""


class NonFiniteLoss(TrainerError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainDataError(TrainerError):
    """The training data cannot be read as stored (e.g. a damaged label chunk); names the array, shard and rows."""


class ShardsChanged(TrainDataError):
    """Most images of a shard differ from the ones labelled; names the shard and an example key."""
