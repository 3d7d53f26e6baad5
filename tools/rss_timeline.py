"""Peak memory of one onnxopt run and where it happens: the child's RSS (anonymous vs file-backed pages) sampled
every 0.2 s next to its log lines, so the peak is tied to a stage (load, calibration, ORT session, write, save).

    python tools/rss_timeline.py --json t.json -- python -m onnxopt quantize unet.onnx --fp8 --preset sdxl \
        --calib calib.npz --provider cpu -o out.onnx -v
    python tools/rss_timeline.py --threads 16 --json t.json --quantize unet.onnx --mode fp8 --calib calib.npz -o out.onnx

`--quantize` runs `onnxopt quantize MODEL --MODE --preset sdxl` through the API with `--threads` worker threads
(the CLI takes one per core: 16 on the GPU machine, 2 on the dev box), so a 2-core box shows the 16-thread
writer's memory. Peak RSS is the child's ru_maxrss (what `/usr/bin/time -v` reports). RssFile is mapped file
pages (ONNX Runtime's memory-mapped external weights, the page cache of files we map); RssAnon is heap (ours
and ORT's own allocations). The table lists, per log line, the highest RSS until the next one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return out


def run(cmd: list[str], interval: float = 0.2) -> dict:
    """Run `cmd`; return its wall time, peak RSS and the timeline of (t, rss, anon, file, last log line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines: list = []

    def reader():
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip()[:160]))
            sys.stderr.write(line)
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    samples = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps with the child's rusage (ru_maxrss)
        if pid:
            break
        s = _status(proc.pid)
        if s:
            samples.append((round(time.perf_counter() - t0, 2), round(s.get("VmRSS", 0), 3),
                            round(s.get("RssAnon", 0), 3), round(s.get("RssFile", 0), 3)))
        time.sleep(interval)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    th.join(5)
    peak = usage.ru_maxrss / 2**20
    # per log line: the highest sampled RSS until the next line
    stages = []
    for i, (t, text) in enumerate(lines):
        t_next = lines[i + 1][0] if i + 1 < len(lines) else float("inf")
        inside = [s for s in samples if t <= s[0] < t_next]
        if inside:
            top = max(inside, key=lambda s: s[1])
            stages.append({"t": round(t, 1), "line": text, "max_rss": top[1], "anon": top[2], "file": top[3]})
    top = max(samples, key=lambda s: s[1]) if samples else None
    return {"cmd": " ".join(cmd), "exit_code": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(peak, 3),
            "sampled_peak": dict(zip(("t", "rss", "anon", "file"), top)) if top else None,
            "stages": stages, "samples": samples}


def _child(args) -> int:
    """The --quantize child: the SDXL preset recipe through the API with an explicit thread count."""
    import logging
    sys.path.insert(0, os.getcwd())
    from onnxopt import api, pipeline, presets
    from onnxopt.settings import RunSettings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = presets.sdxl(args.mode, provider=args.provider)
    settings = RunSettings(provider=args.provider, memory_budget_mb=config.memory_budget_mb, progress=True,
                           threads=args.threads)
    runner = pipeline.Runner.from_settings(api.recipe(config), settings, data=args.calib,
                                           max_batch=config.calib_max_batch)
    res = runner.run(args.quantize, args.output)
    print(json.dumps(res.report.get("breakdown_s")), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result (with the timeline) here")
    ap.add_argument("--quantize", help="model: run the SDXL preset through the API (with --threads)")
    ap.add_argument("--mode", default="fp8")
    ap.add_argument("--calib")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--output")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    if args.quantize:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--quantize", args.quantize, "--mode", args.mode,
               "--calib", args.calib, "--provider", args.provider, "--threads", str(args.threads), "-o", args.output]
    else:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    res = run(cmd)
    print("\n t(s)  max RSS GiB (anon/file)  log line", file=sys.stderr)
    for s in res["stages"]:
        print(f"{s['t']:6.1f}  {s['max_rss']:6.2f} ({s['anon']:.2f}/{s['file']:.2f})  {s['line'][:110]}", file=sys.stderr)
    print(json.dumps({k: v for k, v in res.items() if k not in ("stages", "samples")}), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)
    return res["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
