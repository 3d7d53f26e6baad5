"""Progress for long loops: a tqdm bar on a terminal, periodic plain log lines anywhere else (so logs
written to files or CI get no carriage-return junk)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("onnxopt")
LOG_EVERY_S = 10.0


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def track(items: Iterable[T], *, total: int | None = None, desc: str, enabled: bool = True,
          unit: str = "it") -> Iterator[T]:
    """Yield `items`; show a bar when `enabled` and stderr is a terminal, else log 'desc: i/total' at INFO
    at most every LOG_EVERY_S seconds (and once at the end)."""
    if enabled and on_terminal():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            log.info("%s: %d%s %s (%.0f s)", desc, i, f"/{total}" if total else "", unit, now - start)
    if i and last != start:
        log.info("%s: done, %d %s in %.0f s", desc, i, unit, time.monotonic() - start)


class _LogBar:
    """tqdm's update/close for logs: 'desc: n/total unit' at INFO at most every LOG_EVERY_S seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, enabled: bool):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if self.enabled and now - self.last >= LOG_EVERY_S:
            self.last = now
            log.info("%s: %d%s %s (%.0f s)", self.desc, self.n, f"/{self.total}" if self.total else "", self.unit,
                     now - self.start)

    def close(self) -> None:
        if self.enabled and self.last != self.start:
            log.info("%s: done, %d %s in %.0f s", self.desc, self.n, self.unit, time.monotonic() - self.start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bar(*, total: int | None, desc: str, enabled: bool = True, unit: str = "it"):
    """A progress counter with tqdm's update()/close(): a bar when `enabled` and stderr is a terminal,
    periodic log lines otherwise (nothing at all when not `enabled`)."""
    if enabled and on_terminal():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return _LogBar(total, desc, unit, enabled)
