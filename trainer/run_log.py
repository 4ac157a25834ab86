"""What a run reports: console progress (loss / lr / throughput), a metrics file, TensorBoard if installed.

Only rank 0 creates a `RunLog`; the other ranks get `RunLog.disabled()`, whose methods do nothing.
The metrics file is appended to (a resumed run continues the same file), one record per log event.
On a terminal the progress is one overwritten bar; when stderr is a file or a pipe (a cluster job's log)
it is one plain line every `log_every` steps, as timm's train.py logs, so the log stays readable.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

METRIC_FIELDS = ("kind", "epoch", "update", "loss", "loss_cls", "loss_token", "lr", "images_per_s",
                 "skipped_samples", "time")


class RunLog:
    """Metrics file (JSONL or CSV) + optional TensorBoard + console progress line."""

    def __init__(self, out_dir: str | Path | None, metrics_format: str = "jsonl", tensorboard: bool = True,
                 progress_bar: bool = True, stream=None, log_every: int = 50) -> None:
        self.enabled = out_dir is not None
        self.stream = stream or sys.stderr
        self.progress_bar = progress_bar
        self.log_every = max(1, int(log_every))
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
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
        """On a terminal one overwritten line: [#####.....] epoch e/E step s/S loss lr img/s; else one
        line per `log_every` steps (and the epoch's first and last step)."""
        if not self.enabled or not self.progress_bar:
            return
        figures = (f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} lr {lr:.3g} "
                   f"{images_per_s:.1f} img/s")
        if not self.interactive:
            if step == 1 or step % self.log_every == 0 or step == steps:
                self.stream.write(f"train: {figures}\n")
                self.stream.flush()
            return
        done = int(20 * min(step, steps) / max(steps, 1))
        line = f"\r[{'#' * done}{'.' * (20 - done)}] {figures}"
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


FAILED_SUFFIX = ".failed"


def set_aside_failed_run(out_dir: str | Path, existed_before: bool) -> Path | None:
    """A run that failed before its first checkpoint must not leave a folder that looks like a real run.

    A folder this run created is renamed to OUT.failed (OUT.failed.1, ... if taken) and its new path is
    returned; a folder that existed before (a resumed run, or one the user made) is left where it is with a
    FAILED file in it. Returns None when there is nothing to set aside (a checkpoint exists, or no folder).
    """
    from trainer.checkpoint import LAST

    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / LAST).exists():
        return None
    if existed_before:
        (out_dir / "FAILED").write_text("this run failed before its first checkpoint; see its log\n")
        return out_dir
    target = out_dir.with_name(out_dir.name + FAILED_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = out_dir.with_name(f"{out_dir.name}{FAILED_SUFFIX}.{n}")
    shutil.move(str(out_dir), str(target))
    return target
