"""Worker threads for per-weight numpy work (quantizing, dequantizing, reading weights): numpy and ml_dtypes
release the GIL on big arrays, so a thread pool over weights uses the cores without copying anything
between processes. Results come back in input order, so whatever consumes them (graph edits, file writes)
does so in the same order as a single thread would: outputs do not depend on the thread count."""
from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 16  # beyond this, per-weight work is bound by memory bandwidth


def count(threads: int = 0) -> int:
    """Threads to use: `threads` if > 0, else the cores this process may run on (at most MAX_THREADS)."""
    if threads and threads > 0:
        return int(threads)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


SMALL_BYTES = 32 << 20  # below this much data, worker threads cost more than they save


def for_bytes(nbytes: int, threads: int = 0) -> int:
    """Threads for work over `nbytes` of arrays: an explicit `threads` as given; automatic (0): one for small
    models (no pool at all), else one per core."""
    return count(threads) if threads and threads > 0 else (1 if nbytes < SMALL_BYTES else count(0))


# Memory that per-weight work in flight (submitted to a worker, or done and not yet consumed) may hold at once:
# this, not the thread count, bounds the pool (16 threads x a window of 2 items of SDXL's 52 MB FP32 weights,
# with their codes and temporaries, took the writer to 2.8 GiB). Callers give each item's cost in bytes.
IN_FLIGHT_BYTES = 512 << 20


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int = 0, window: int = 0,
                cost: Callable[[T], int] | None = None, budget: int = IN_FLIGHT_BYTES) -> Iterator[R]:
    """`map(fn, items)` on `threads` worker threads, yielding results in input order. At most `window` items
    (default 2 per thread) are in flight, and with `cost(item)` (bytes) at most `budget` bytes of them: an item
    counts from its submission until the consumer asks for the result after it, so a consumer that writes each
    result out before asking for the next holds at most `budget` bytes of work (one item alone may exceed it).
    One thread: no pool, one item at a time."""
    n = count(threads)
    if n <= 1:
        yield from map(fn, items)
        return
    window = window or 2 * n
    with ThreadPoolExecutor(n, thread_name_prefix="onnxopt") as pool:
        pending: deque = deque()  # (future, its cost), oldest first
        held = 0                  # cost of the pending items and of the result the consumer holds
        for item in items:
            c = int(cost(item)) if cost is not None else 0
            while pending and (len(pending) >= window or (cost is not None and held + c > budget)):
                fut, done = pending.popleft()
                yield fut.result()
                del fut   # the future holds the result: the consumer has come back and no longer needs it
                held -= done
            pending.append((pool.submit(fn, item), c))
            held += c
        while pending:
            fut, done = pending.popleft()
            yield fut.result()
            del fut
            held -= done


def one_blas_thread(enabled: bool = True):
    """A context running numpy's linear algebra on one BLAS thread (threadpoolctl, when installed; else nothing):
    OpenBLAS's threads spin-wait, and on a loaded 2-core machine a 2304x128 SVD took 18 s threaded vs 0.3 s on
    one thread. For small matrices only (`enabled`); big ones gain from the threads."""
    if enabled:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits
            return threadpool_limits(1)
    return contextlib.nullcontext()


_blas_control = []   # threadpoolctl's controller, made once (its library scan takes ~1 ms, a limit 10 us)


@contextlib.contextmanager
def blas_threads(n: int):
    """A context running numpy's linear algebra on `n` BLAS threads; yields whether it could (threadpoolctl
    installed). For matmuls on several worker threads at once, which on BLAS's full thread count each would
    oversubscribe the cores. OpenBLAS's GEMM (numpy's wheels) splits rows and columns over its threads, never a
    dot product, so its numbers do not depend on `n` (tests/test_smoothquant_search.py checks them)."""
    if not _blas_control:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_control.append(None)
        else:
            _blas_control.append(ThreadpoolController())
    if _blas_control[0] is None:
        yield False
        return
    with _blas_control[0].limit(limits=max(1, int(n)), user_api="blas"):
        yield True
