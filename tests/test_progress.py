"""Progress without a terminal (issue 22 item 7): log lines at least every LOG_EVERY_S seconds of long work
(stage, done/total, elapsed), also while one step takes longer than that; nothing with -q."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import tiny

ROOT = Path(__file__).resolve().parents[1]


def _env(every: float) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "ONNXOPT_LOG_EVERY_S": str(every)}


def test_quantize_logs_progress_off_a_terminal(tmp_path):
    src = tmp_path / "t.onnx"
    tiny.save(tiny.transformer(), src)
    np.savez(tmp_path / "c.npz", ids=np.random.default_rng(0).integers(0, 50, (24, 1, 16)).astype(np.int64))
    args = [sys.executable, "-m", "onnxopt", "quantize", str(src), "--int8", "--calib", str(tmp_path / "c.npz"),
            "-o", str(tmp_path / "q.onnx")]
    r = subprocess.run(args, capture_output=True, text=True, env=_env(0.0001), timeout=300)  # stderr is a pipe; every step is due
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "onnxopt.progress" in line]
    assert any(re.search(r"calibrating: \d+/24 batch \(\d+ s\)", line) for line in lines), r.stderr
    assert "\r" not in r.stderr
    r = subprocess.run(args + ["-q"], capture_output=True, text=True, env=_env(0.05), timeout=300)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr + r.stdout


def test_a_long_step_still_reports(tmp_path):
    """One item (or one pass) longer than the interval: the heartbeat says where the run is meanwhile."""
    code = """
import logging, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
logging.getLogger("onnxopt.progress").setLevel(logging.INFO)
from onnxopt import progress
for i in progress.track([1, 2], desc="long step", unit="layer"):
    time.sleep(1.0)
with progress.stage("pass slow"):
    time.sleep(1.0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(0.3), timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert any(re.fullmatch(r"long step: 0/2 layer \(\d+ s\)", line) for line in out), out  # inside item 1
    assert any(re.fullmatch(r"long step: 1/2 layer \(\d+ s\)", line) for line in out), out
    assert any(line.startswith("long step: done, 2 layer in") for line in out), out
    assert any(re.fullmatch(r"pass slow \(\d+ s\)", line) for line in out), out
