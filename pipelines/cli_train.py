"""`stl-train`: stage-1 labeler training, student training on stored token labels, evaluation.

Command bodies stay short and import torch inside the command so `--help` is fast.
"""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train FAN token-labelers and students; evaluate.")


@app.callback()
def main() -> None:
    """Train FAN token-labelers (stage 1) and students on stored token labels (stage 2); evaluate."""


# --- commands: student, labeler, eval, bench ---------------------------------------------------
