"""`stl-labels`: build, inspect and benchmark label stores.

Command bodies stay short (load config → apply overrides → validate → call the library) and import
heavy modules (torch, ray) inside the command, so `stl-labels --help` stays fast and loads no Ray.
"""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Offline STL token labels: build and inspect label stores.")
bench_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Benchmarks that print measured figures.")
app.add_typer(bench_app, name="bench")


@app.callback()
def main() -> None:
    """Offline STL token labels: generate, inspect and verify label stores."""


@bench_app.callback()
def bench_main() -> None:
    """Benchmarks (they print figures; nothing is asserted)."""


# --- store inspection: info, verify, bench store ----------------------------------------------

# --- labeling job: generate, shard, bench generate --------------------------------------------

# --- demo and quality: demo-data, report -------------------------------------------------------
