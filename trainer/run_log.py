"""What a run reports: a console progress bar (loss / lr / throughput), a metrics file, TensorBoard if installed.

Only rank 0 creates a `RunLog`; the other ranks get `RunLog.disabled()`, whose methods do nothing.
The metrics file is appended to (a resumed run continues the same file), one record per log event.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

METRIC_FIELDS = ("kind", "epoch", "update", "loss", "loss_cls", "loss_token", "lr", "images_per_s",
                 "skipped_samples", "time")


class RunLog:
    """Metrics file (JSONL or CSV) + optional TensorBoard + console progress line."""

    def __init__(self, out_dir: str | Path | None, metrics_format: str = "jsonl", tensorboard: bool = True,
                 progress_bar: bool = True, stream=None) -> None:
        self.enabled = out_dir is not None
        self.stream = stream or sys.stderr
        self.progress_bar = progress_bar
        self._tb = None
        self._path: Path | None = None
        self._format = metrics_format
        self._bar_width = 0
        if not self.enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._path = out_dir / f"metrics.{metrics_format}"
        if metrics_format == "csv" and not self._path.exists():
            with open(self._path, "w", newline="") as f:
                csv.writer(f).writerow(METRIC_FIELDS)
        if tensorboard:
            try:  # TensorBoard is optional: the run must not need it
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    @classmethod
    def disabled(cls) -> "RunLog":
        return cls(None)

    @property
    def metrics_path(self) -> Path | None:
        return self._path

    def record(self, kind: str, **values: Any) -> None:
        """Append one record ('train' every log_every updates, 'epoch' at each epoch end, 'stop', ...)."""
        if not self.enabled:
            return
        row = {"kind": kind, "time": round(time.time(), 3), **values}
        if self._format == "jsonl":
            with open(self._path, "a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            with open(self._path, "a", newline="") as f:
                csv.writer(f).writerow([row.get(k, "") for k in METRIC_FIELDS])
        if self._tb is not None and "update" in values:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("update", "epoch"):
                    self._tb.add_scalar(f"{kind}/{k}", v, values["update"])

    def progress(self, epoch: int, epochs: int, step: int, steps: int, loss: float, lr: float,
                 images_per_s: float) -> None:
        """One overwritten console line: [#####.....] epoch e/E step s/S loss lr img/s."""
        if not self.enabled or not self.progress_bar:
            return
        done = int(20 * min(step, steps) / max(steps, 1))
        line = (f"\r[{'#' * done}{'.' * (20 - done)}] epoch {epoch + 1}/{epochs} step {step}/{steps} "
                f"loss {loss:.4f} lr {lr:.3g} {images_per_s:.1f} img/s")
        self._bar_width = max(self._bar_width, len(line))
        self.stream.write(line.ljust(self._bar_width))
        self.stream.flush()

    def message(self, text: str) -> None:
        """A plain console line (ends any progress line first)."""
        if not self.enabled:
            return
        if self._bar_width:
            self.stream.write("\n")
            self._bar_width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._bar_width:
            self.stream.write("\n")
            self._bar_width = 0
