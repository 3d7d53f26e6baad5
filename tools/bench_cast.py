"""FP32 -> FP8 E4M3 cast speed: ml_dtypes (`np.clip(x, -448, 448).astype(float8_e4m3fn)`, FP8.cast before issue 25)
against formats.fp8.e4m3_codes (FP8.cast's float32 path now), both in CHUNK-element tasks on 1 or more threads as
FP8.cast runs them, plus FP8.cast itself (its own thread count). The input is weight-like: per-channel
N(0, 1) / absmax * 448, so every E4M3 binade, subnormals included, is hit. Old and new are interleaved, best of
--repeat (wall and process CPU time, each its own minimum); the codes are checked equal.

    python tools/bench_cast.py [--sizes 16,64] [--threads 1,2] [--repeat 3] [--json out.json]
    python tools/bench_cast.py --nested 1,2     # FP8.cast from 1 or 2 outer threads (as the writer's), inner pool or not
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxopt.formats import fp8  # noqa: E402


def old_part(x: np.ndarray, out: np.ndarray) -> None:
    out[:] = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def in_tasks(fn, x: np.ndarray, out: np.ndarray, threads: int) -> None:
    starts = range(0, x.size, fp8.CHUNK)
    task = lambda i: fn(x[i:i + fp8.CHUNK], out[i:i + fp8.CHUNK])  # noqa: E731
    if threads == 1:
        for i in starts:
            task(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(task, starts))


def weights(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n // 4096, 4096), dtype=np.float32)
    return (w / np.abs(w).max(axis=1, keepdims=True) * np.float32(448)).reshape(-1)


def timed(fn) -> tuple[float, float]:
    """(wall, CPU seconds of the whole process: all threads): CPU time is what the shared box distorts least."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def row(m: int, threads, n: int, old, new) -> dict:
    """Best wall and best CPU time of the repeats (each its own minimum)."""
    r = {"elements_M": m, "threads": threads}
    for name, runs in (("old", old), ("new", new)):
        if runs:
            wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
            r.update({f"{name}_s": round(wall, 4), f"{name}_cpu_s": round(cpu, 4),
                      f"{name}_cpu_ns_per_el": round(cpu / n * 1e9, 2)})
    if old:
        r["speedup_wall"] = round(r["old_s"] / r["new_s"], 2)
        r["speedup_cpu"] = round(r["old_cpu_s"] / r["new_cpu_s"], 2)
    return r


def nested(outer_counts: list[int], repeat: int) -> list[dict]:
    """Eight 4 M-element parts (cast_over's 16 MB) cast by `outer` threads, each FP8.cast with its inner pool
    (CHUNK as shipped) or without (one chunk): wall seconds, best of `repeat`, interleaved."""
    parts = [weights(4 << 20) for _ in range(8)]
    chunk, rows = fp8.CHUNK, []
    try:
        for outer in outer_counts:
            best = {}
            for _ in range(repeat):
                for inner, c in (("pool", chunk), ("none", 1 << 40)):
                    fp8.CHUNK = c
                    with ThreadPoolExecutor(outer) as pool:
                        wall, _ = timed(lambda: list(pool.map(fp8.FP8_E4M3.cast, parts)))
                    best[inner] = min(best.get(inner, wall), wall)
            rows.append({"outer_threads": outer, "inner_pool_s": round(best["pool"], 4),
                         "no_inner_pool_s": round(best["none"], 4)})
            print(f"outer threads {outer}: inner pool {best['pool']:.3f} s, none {best['none']:.3f} s (32 M elements)")
    finally:
        fp8.CHUNK = chunk
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64", help="millions of elements, comma-separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nested", help="outer thread counts (comma-separated): the nested-pool table instead")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.nested:
        rows = nested([int(s) for s in args.nested.split(",")], args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps({"nested": rows, "chunk": fp8.CHUNK}, indent=1))
        return
    rows = []
    for m in (int(s) for s in args.sizes.split(",")):
        x = weights(m << 20)
        a, b = np.empty(x.size, np.uint8), np.empty(x.size, np.uint8)
        for t in (int(s) for s in args.threads.split(",")):
            old, new = [], []
            for _ in range(args.repeat):  # interleaved: the box is shared
                old.append(timed(lambda: in_tasks(old_part, x, a, t)))
                new.append(timed(lambda: in_tasks(fp8.e4m3_codes, x, b, t)))
            assert np.array_equal(a, b), "codes differ"
            rows.append(row(m, t, x.size, old, new))
        rows.append(row(m, "FP8.cast", x.size, None, [timed(lambda: fp8.FP8_E4M3.cast(x)) for _ in range(args.repeat)]))
    print(f"{'M el':>5} {'threads':>9} {'old s':>7} {'new s':>7} {'x wall':>7} {'old cpu ns/el':>14} "
          f"{'new cpu ns/el':>14} {'x cpu':>6}")
    for r in rows:
        print(f"{r['elements_M']:>5} {r['threads']!s:>9} {r.get('old_s', '-')!s:>7} {r['new_s']:>7} "
              f"{r.get('speedup_wall', '-')!s:>7} {r.get('old_cpu_ns_per_el', '-')!s:>14} {r['new_cpu_ns_per_el']:>14} "
              f"{r.get('speedup_cpu', '-')!s:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "chunk": fp8.CHUNK, "block": fp8.BLOCK}, indent=1))


if __name__ == "__main__":
    main()
