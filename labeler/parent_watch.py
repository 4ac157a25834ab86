"""Helper processes (decode processes, store writers) end when the process that started them dies.

Without this, a helper blocked on its next job, or on a flow-control semaphore, waits forever once its
parent is SIGKILLed (a Ray actor killed mid-job, an out-of-memory kill), holding its memory and open files.
What it was doing is cut short; nothing it writes is visible before its shard's `done`, so that shard is
simply labelled again.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading


def exit_with_parent() -> None:
    """In a spawned child: end this process (`os._exit`) as soon as its parent process ends."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child: nothing to watch
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="stl-parent-watch", daemon=True).start()
