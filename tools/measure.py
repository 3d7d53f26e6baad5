"""Run one command; print its wall time and peak RSS (the OS's ru_maxrss of the child) as a JSON line.

    python tools/measure.py --label fp8 --json out.jsonl -- onnxopt quantize unet.onnx --fp8 ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--json", help="append the result line to this file")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    row = {"label": args.label or " ".join(cmd[:3]), "cmd": " ".join(cmd), "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "exit_code": os.waitstatus_to_exitcode(status)}
    line = json.dumps(row)
    print(line, file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return row["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
