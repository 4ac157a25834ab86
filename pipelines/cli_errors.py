"""The one way both CLIs turn an error the user can fix into one `error: ...` line on stderr and exit code 2.

User errors are the packages' own bases (a bad config, store, teacher, device or training run) plus
ValueError and OSError (bad values, missing files); anything else is a bug and keeps its traceback.
The error classes are imported only when something was raised, so `--help` loads neither zarr nor torch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import typer


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean "fix your input", one base per package."""
    from labeler.errors import LabelerError
    from labelstore import StoreError
    from pipelines.config import ConfigError
    from trainer.errors import TrainerError

    return (ConfigError, StoreError, LabelerError, TrainerError, ValueError, OSError)


@contextlib.contextmanager
def exit_2_on_user_error() -> Iterator[None]:
    """`with exit_2_on_user_error(): ...` around a command body: a user error prints one line and exits 2."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
