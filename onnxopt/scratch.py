"""Scratch folders removed on a background thread.

Deleting gigabytes of files (a big model's stage boundaries) is seconds of kernel time: 2.7 s of a full-size SDXL
`--fp8` run's calibration on an H100 host, spent after the last stage has run and before the writer can start. The
work after it does not read the folder, so it is removed beside that work. The thread is not a daemon: the
interpreter waits for it at exit, so no folder is left behind by a run that ends normally."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

_pending: list[threading.Thread] = []


def remove_later(path: Path) -> threading.Thread:
    """Remove `path` (a folder) on a new non-daemon thread; returns the thread."""
    t = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                         name="onnxopt-remove", daemon=False)
    t.start()
    _pending[:] = [p for p in _pending if p.is_alive()] + [t]
    return t


def wait() -> None:
    """Wait for every removal started so far (tests; a caller about to measure disk use)."""
    for t in list(_pending):
        t.join()
