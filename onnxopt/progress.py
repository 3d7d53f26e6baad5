"""Progress for long work: a tqdm bar on a terminal; anywhere else (CI logs, nohup, pipes) plain log lines on the
`onnxopt.progress` logger, at least every LOG_EVERY_S seconds while work runs ("stage: done/total unit (elapsed)"),
also when one step takes longer than that (a heartbeat thread says where the run is)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("onnxopt.progress")
# Seconds between lines; ONNXOPT_LOG_EVERY_S changes it (tests, very chatty CI).
LOG_EVERY_S = float(os.environ.get("ONNXOPT_LOG_EVERY_S", "") or 10.0)
_TICK_S = min(1.0, max(0.01, LOG_EVERY_S / 4))


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _Activity:
    """One piece of long work: its name, how far it is, when it started and when it was last reported."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.start = self.last = time.monotonic()

    def line(self, now: float) -> str:
        count = f": {self.n}{f'/{self.total}' if self.total else ''} {self.unit}" if self.unit else ""
        return f"{self.desc}{count} ({now - self.start:.0f} s)"


class _Heartbeat:
    """The activities under way (innermost last) and one daemon thread that reports the innermost when nothing
    was said for LOG_EVERY_S."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active: list[_Activity] = []
        self.thread: threading.Thread | None = None
        self.said = time.monotonic()  # the last progress line of any activity

    def push(self, a: _Activity) -> None:
        with self.lock:
            self.active.append(a)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="onnxopt-progress", daemon=True)
                self.thread.start()

    def pop(self, a: _Activity) -> None:
        with self.lock:
            if a in self.active:
                self.active.remove(a)

    def report(self, a: _Activity, now: float) -> None:
        with self.lock:
            a.last = self.said = now
        log.info("%s", a.line(now))

    def _run(self) -> None:
        while True:
            time.sleep(_TICK_S)
            with self.lock:
                if not self.active:
                    self.thread = None
                    return
                a = self.active[-1]
                now = time.monotonic()
                due = now - max(a.last, self.said) >= LOG_EVERY_S
            if due:
                self.report(a, now)


_HEART = _Heartbeat()


def _logging_wanted(enabled: bool) -> bool:
    return enabled and log.isEnabledFor(logging.INFO)


def track(items: Iterable[T], *, total: int | None = None, desc: str, enabled: bool = True,
          unit: str = "it") -> Iterator[T]:
    """Yield `items`; show a bar when `enabled` and stderr is a terminal, else log 'desc: i/total unit (elapsed)'
    at INFO at least every LOG_EVERY_S seconds while it runs (and once at the end when it took that long)."""
    if enabled and on_terminal():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        return
    if total is None and isinstance(items, (list, tuple, range, dict)):  # never len() a lazy data set
        total = len(items)
    with _LogBar(total, desc, unit, enabled) as b:
        for item in items:
            yield item
            b.update(1)


class _LogBar:
    """tqdm's update/close for logs: 'desc: n/total unit (elapsed)' at INFO at least every LOG_EVERY_S seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, enabled: bool):
        self.enabled = _logging_wanted(enabled)
        self.activity = _Activity(desc, total, unit)
        self.closed = False
        if self.enabled:
            _HEART.push(self.activity)

    @property
    def n(self) -> int:
        return self.activity.n

    def update(self, k: int = 1) -> None:
        a = self.activity
        a.n += k
        if self.enabled:
            now = time.monotonic()
            if now - a.last >= LOG_EVERY_S:
                _HEART.report(a, now)

    def close(self) -> None:
        if self.closed or not self.enabled:
            return
        self.closed = True
        _HEART.pop(self.activity)
        a, now = self.activity, time.monotonic()
        if now - a.start >= LOG_EVERY_S:
            log.info("%s: done, %d %s in %.0f s", a.desc, a.n, a.unit, now - a.start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # a counter dropped by an exception must not keep the heartbeat reporting it
        if not self.closed and self.enabled:
            _HEART.pop(self.activity)


def bar(*, total: int | None, desc: str, enabled: bool = True, unit: str = "it"):
    """A progress counter with tqdm's update()/close(): a bar when `enabled` and stderr is a terminal,
    periodic log lines otherwise (nothing at all when not `enabled`)."""
    if enabled and on_terminal():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return _LogBar(total, desc, unit, enabled)


@contextlib.contextmanager
def stage(desc: str, enabled: bool = True):
    """Long work without a counter (a pass, the finite check, the save): off a terminal, 'desc (elapsed)' every
    LOG_EVERY_S seconds while it runs, unless a counter inside it speaks."""
    if not _logging_wanted(enabled) or on_terminal():
        yield
        return
    a = _Activity(desc, None, "")
    _HEART.push(a)
    try:
        yield
    finally:
        _HEART.pop(a)
