"""Every shell command and Python snippet of README.md, run as written on the README's own example
(tools/make_example.py): the model, calibration and evaluation names the README uses are that example's files.
`onnxopt` runs as `python -m onnxopt` from this checkout (the console script may belong to another install).
Commands that cannot run here are listed in SKIP, each with its reason, and those needing full TensorRT or a
CUDA GPU are skipped only where it is missing; nothing else is left out."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 600

# Commands (by prefix, after `onnxopt` became `python -m onnxopt`) that need what CI lacks. Keep this list short:
# a README line that fails here for another reason is a README bug.
SKIP = {
    "pip install": "installs packages (the test runs in the installed environment)",
    "python -m pytest": "runs the test suite itself",
    "python -m models.sdxl_unet": "exports the full-size SDXL UNet (9.6 GiB of weights)",
    "python -m onnxopt calib-data sdxl -o unet/calib.npz": "writes SDXL-size latents for the full-size UNet line that follows",
    "python -m onnxopt calib-data trajectory unet.onnx": "samples an SDXL UNet (timestep input): the full-size export",
    "python -m onnxopt compare unet.onnx unet.fp8.onnx --sampler": "samples an SDXL UNet (timestep input): the full-size export",
    "python -m onnxopt compare unet.onnx unet.fp8.onnx --pipeline": "needs a diffusers SDXL pipeline folder (no SDXL weights offline)",
    "python -m onnxopt quantize unet/unet.onnx": "needs the full-size SDXL UNet export",
    "python -m onnxopt inspect unet/unet.fp8.onnx": "needs the full-size SDXL UNet export",
}
# Lines that need what a machine may lack: skipped only where it is missing.
NEEDS_TRT = "python -m onnxopt build model.fp8.onnx -o model.plan"
# Lines that also need a GPU: any with --provider cuda.
GPU = "--provider cuda"
# Heavy lines (searches, error-feedback rounding, engine builds): marked slow.
SLOW = ("--auto", "--awq full", "sparsegpt", "--engine", "--backend rtx", "bench ", "--smoothquant auto", "--preset sdxl",
        "--sampler", "calib-data")


def _blocks(text: str):
    """(language, body) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


ASSIGN = re.compile(r"^[A-Za-z_]\w*=")


def _lines() -> list[list[str]]:
    """Each README shell line as its commands (a `&&` chain runs in order, in one folder). A variable the block
    sets (`T=$(...)`) is set again in front of every later command that reads a variable."""
    lines, prelude = [], ""  # a reader's shell keeps a variable for the blocks after it too
    for lang, body in _blocks(README.read_text()):
        if lang == "python":
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line:
                continue
            if ASSIGN.match(line):
                prelude += line + "; "
                continue
            cmds = []
            for part in line.split(" && "):
                part = re.sub(r"^onnxopt ", "python -m onnxopt ", part.strip())
                part = re.sub(r"^python tools/", f"python {ROOT}/tools/", part)  # run from the checkout
                cmds.append(prelude + part if prelude and "$" in part else part)
            lines.append(cmds)
    return lines


def _commands() -> list[str]:
    return [c for line in _lines() for c in line]


def _snippets() -> list[str]:
    return [body for lang, body in _blocks(README.read_text()) if lang == "python"]


@functools.cache
def _cuda_usable() -> bool:
    """ONNX Runtime can run on CUDA here (the same check `--provider cuda` makes)."""
    from onnxopt.errors import OnnxoptError
    from onnxopt.ort import check_provider
    try:
        check_provider("cuda")
    except OnnxoptError:
        return False
    return True


def _skip_reason(cmd: str) -> str | None:
    cmd = cmd.rsplit("; ", 1)[-1]  # past a block's variable assignments
    for prefix, why in SKIP.items():
        if cmd.startswith(prefix):
            return why
    if cmd.startswith(NEEDS_TRT) and importlib.util.find_spec("tensorrt") is None:
        return "needs full TensorRT (the trt extra), not importable here"
    if GPU in cmd and not _cuda_usable():
        return "needs a CUDA GPU (--provider cuda) and onnxruntime-gpu"
    return None


def _params():
    out = []
    for i, cmds in enumerate(_lines()):
        run = [c for c in cmds if _skip_reason(c) is None]
        marks = [] if run else [pytest.mark.skip(reason=_skip_reason(cmds[0]))]
        if any(s in c for c in run for s in SLOW):
            marks.append(pytest.mark.slow)
        if any("rtx" in c or "--engine" in c for c in run):
            marks.append(pytest.mark.rtx)
        out.append(pytest.param(cmds, marks=marks, id=f"{i:02d}-{' && '.join(c.rsplit('; ', 1)[-1] for c in cmds)[:70]}"))
    return out


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's example under every name the README gives a model or data file, plus the FP8 and INT8
    outputs the later lines read (made by the README's own first command)."""
    d = tmp_path_factory.mktemp("readme")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_example.py"), str(d / "example")], check=True,
                   env=_env(), timeout=TIMEOUT)
    ex = d / "example"
    for name in ("model.onnx", "unet.onnx", "bert.onnx", "cnn.onnx"):
        shutil.copy(ex / "model.onnx", d / name)
    for name in ("calib.npz", "images.npz", "sdxl_calib.npz"):
        shutil.copy(ex / "calib.npz", d / name)
    shutil.copy(ex / "eval.npz", d / "eval.npz")
    (d / "calib").mkdir()
    shutil.copy(ex / "calib.npz", d / "calib" / "part0.npz")
    for mode in ("fp8", "int8"):
        subprocess.run([sys.executable, "-m", "onnxopt", "-q", "quantize", "model.onnx", f"--{mode}", "--calib", "calib.npz",
                        "-o", f"model.{mode}.onnx"], cwd=d, check=True, env=_env(), timeout=TIMEOUT)
    return d


@pytest.fixture
def workdir(example, tmp_path):
    """A fresh copy of the example folder per command, so no command sees another's output."""
    w = tmp_path / "w"
    shutil.copytree(example, w)
    return w


def test_readme_has_commands_and_snippets():
    cmds = _commands()
    assert len(cmds) >= 20 and len(_snippets()) >= 2
    assert any(c.startswith("python -m onnxopt bench ") for c in cmds)


TERRAIN = ("T=$(python -c \"import terrain_diffusion,os;print(os.path.dirname(terrain_diffusion.__file__))\")"
           "/weights/terrain_consistency_unet_difficulty100.onnx; ")


def _terrain_int8(workdir) -> None:
    """t.int8.onnx, which the README's sampler lines compare: the terrain UNet quantized as the README's
    trajectory section says (calibration recorded along its own sampler loop)."""
    steps = [TERRAIN + "python -m onnxopt -q calib-data trajectory $T --sampler consistency --steps 3 --seeds 0-3 -o t.traj.npz",
             TERRAIN + "python -m onnxopt -q quantize $T --int8 --calib t.traj.npz -o t.int8.onnx"]
    for step in steps:
        subprocess.run(["bash", "-c", step], cwd=workdir, check=True, env=_env(), timeout=TIMEOUT)


@pytest.mark.parametrize("cmds", _params())
def test_readme_command(cmds, workdir):
    if any("t.int8.onnx" in c for c in cmds):
        _terrain_int8(workdir)
    for cmd in cmds:
        if _skip_reason(cmd):
            continue
        argv = ["bash", "-c", cmd] if "$" in cmd else shlex.split(cmd)
        r = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{cmd}\n{out[-3000:]}"
        assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("i", range(len(_snippets())))
def test_readme_python(i, workdir):
    """Each snippet in a fresh interpreter (an import it forgets is not supplied by an earlier one)."""
    code = _snippets()[i]
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode == 0, f"{code}\n{(r.stdout + r.stderr)[-3000:]}"


def test_readme_inline_python(workdir):
    """Inline Python the prose shows (`onnxopt.presets.recipe(...)`) after a bare `import onnxopt`."""
    inline = re.findall(r"`(onnxopt\.\w+\.\w+\([^`]*\))`", README.read_text())
    assert inline
    code = "import onnxopt\n" + "\n".join(f"print({x})" for x in inline)
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
