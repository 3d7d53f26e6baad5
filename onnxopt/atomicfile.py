"""Atomic output files: a temporary file beside the target, renamed over it only when complete, with the mode
a plain open() would give; and the checks that an output location is writable, made before any work."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import OnnxoptError


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only other way, by setting and restoring it
    os.umask(mask)
    return mask


def output_mode(path: str | os.PathLike) -> int:
    """The mode a plain open() would leave `path` with: an existing file keeps its own, a new one gets
    0666 less the umask (mkstemp creates 0600, which other users and containers cannot read)."""
    with contextlib.suppress(FileNotFoundError):
        return os.stat(path).st_mode & 0o7777
    return 0o666 & ~_umask()


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file onto `path`, giving it the mode `output_mode` says."""
    os.chmod(tmp, output_mode(path))
    os.replace(tmp, path)


def temp_beside(path: Path, suffix: str = ".tmp", name: str | None = None) -> tuple[int, str]:
    """A temporary file beside `path` (creating its folder); a place that cannot be written is a user error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{name or path.name}.", suffix=suffix, dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise OnnxoptError(f"cannot write {path}: a file is in the way of its folder; choose another location") from None
    except OSError as e:
        raise OnnxoptError(f"cannot write {path} ({e.strerror or type(e).__name__}); choose a writable location") from None


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Fail before any work when `path` cannot be written (its nearest existing folder is a file or read-only)."""
    p = Path(path).absolute().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise OnnxoptError(f"{option} {path}: {p} is a file, not a folder; choose another location")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OnnxoptError(f"{option} {path}: {p} is not writable; choose another location")
    try:  # access() says yes to root everywhere: a read-only mount or /proc only shows when one tries
        fd, probe = tempfile.mkstemp(prefix=".onnxopt-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OnnxoptError(f"{option} {path}: cannot create files in {p} ({e.strerror or type(e).__name__}); "
                           "choose another location") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = temp_beside(path, suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike) -> None:
    """-o is not the input, and its folder can take a file: both before any work."""
    if Path(output).resolve() == Path(input_path).resolve():
        raise OnnxoptError(f"output path {output} is the input; choose another -o so that the input stays untouched")
    if Path(output).is_dir():
        raise OnnxoptError(f"output path {output} is a folder; give a file name, e.g. -o {Path(output) / 'model.out.onnx'}")
    check_writable(output, "-o")
