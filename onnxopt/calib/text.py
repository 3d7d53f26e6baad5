"""Calibration data from text for token-input models (BERT-style encoders): one sample per line of a text file,
tokenized by the model's own Hugging Face tokenizer, each sample at its own length (no padding), one .npz per sample
in a folder that `quantize --calib` reads in name order.

Why unpadded: padded positions are activations that no output reads (the attention mask hides them), yet every
calibration statistic (activation ranges, AWQ's Gram matrices, the W4A4 smoothing and error feedback) would count them
(42% of MiniLM's rows padded to its longest sentence). A model with a static sequence length gets its samples padded
to it (nothing else would run).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import OnnxoptError
from .data import InputSpec

MAX_LINES = 100_000       # bound on the samples one call writes


def read_lines(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (at most `limit`, and at most MAX_LINES)."""
    cap = min(limit or MAX_LINES, MAX_LINES)
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            s = line.strip()
            if s:
                out.append(s)
                if len(out) >= cap:
                    break
    if not out:
        raise OnnxoptError(f"--text {path}: the file has no text; write one sample (sentence or passage) per line")
    return out


def load_tokenizer(folder: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder (tokenizer.json / vocab.txt and its config), offline."""
    p = Path(folder)
    if not p.is_dir():
        raise OnnxoptError(f"--tokenizer {folder}: not a folder; give the model's local folder (with tokenizer.json or vocab.txt)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise OnnxoptError("calib-data text needs the transformers package (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a folder without a tokenizer
        raise OnnxoptError(f"--tokenizer {folder}: no tokenizer could be loaded ({type(e).__name__}); give the folder "
                           f"holding tokenizer.json or vocab.txt and tokenizer_config.json") from None


def static_length(specs: list[InputSpec]) -> int | None:
    """The sequence length fixed by the model's inputs (None: dynamic)."""
    fixed = {s.shape[-1] for s in specs if len(s.shape) >= 2 and isinstance(s.shape[-1], int) and s.shape[-1] > 0}
    if len(fixed) > 1:
        raise OnnxoptError(f"the model's token inputs disagree on their sequence length ({sorted(fixed)}); "
                           f"calib-data text serves inputs of one [batch, sequence] shape")
    return fixed.pop() if fixed else None


def tokenize(tokenizer, specs: list[InputSpec], lines: list[str], max_length: int) -> list[dict[str, np.ndarray]]:
    """One feed per line: {input name: [1, length]} in the model's dtypes, unpadded (or padded to a static length)."""
    for s in specs:
        if len(s.shape) != 2 or s.dtype.kind not in "iu":
            raise OnnxoptError(f"input '{s.name}' has shape {s.shape} and dtype {s.dtype}; calib-data text serves "
                               f"models whose inputs are [batch, sequence] integer tokens (input_ids, attention_mask, ...)")
    fixed = static_length(specs)
    if fixed is not None:  # the model runs that length only: pad (and truncate) to it
        max_length = fixed
    feeds = []
    for line in lines:
        enc = tokenizer(line, truncation=True, max_length=max_length,
                        padding="max_length" if fixed is not None else False)
        missing = [s.name for s in specs if s.name not in enc]
        if missing:
            raise OnnxoptError(f"the tokenizer gives {sorted(enc.keys())}, the model also needs {missing}; "
                               f"use the model's own tokenizer, or write the .npz yourself")
        feeds.append({s.name: np.asarray(enc[s.name], dtype=s.dtype)[None, :] for s in specs})
    return feeds


def check_output(folder: str | os.PathLike) -> Path:
    """`folder` as a Path if it is new or an empty folder (checked before any work), else a one-line error."""
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OnnxoptError(f"-o {folder}: exists and is not an empty folder; give a new folder (its .npz files are the samples)")
    return out


def write_folder(feeds: list[dict[str, np.ndarray]], folder: str | os.PathLike) -> Path:
    """Write one .npz per feed (00000.npz, ...) into `folder`, which must be new or empty."""
    out = check_output(folder)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(feeds))))
    for i, f in enumerate(feeds):
        np.savez(out / f"{i:0{width}d}.npz", **f)
    return out
