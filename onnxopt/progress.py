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
