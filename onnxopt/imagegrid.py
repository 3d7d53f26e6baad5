"""Side-by-side PNG grids (reference | candidate | |difference| of samples; reference | candidate of decoded images),
written with zlib and struct alone."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from . import atomicfile


def write_png(path, pixels: np.ndarray) -> Path:
    """Write uint8 pixels [H, W] (grey) or [H, W, 3] (RGB) as a PNG, atomically."""
    px = np.ascontiguousarray(pixels, np.uint8)
    h, w = px.shape[:2]
    colour = 2 if px.ndim == 3 else 0
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    with atomicfile.atomic_path(path, suffix=".tmp.png") as tmp:
        tmp.write_bytes(data)
    return path


def _image(a: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] (one channel) or [H, W, 3] (the first three channels of latents)."""
    return a[0] if a.shape[0] < 3 else np.moveaxis(a[:3], 0, -1)


def grid(ref: np.ndarray, cand: np.ndarray, pad: int = 2) -> np.ndarray:
    """One row per sample: reference | candidate | |cand - ref|; both samples share the reference's range,
    the difference is stretched to its own maximum (over the whole grid) so that small errors show."""
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    lo, hi = float(ref.min()), float(ref.max())
    span = hi - lo if hi > lo else 1.0
    diff = np.abs(cand - ref)
    dmax = float(diff.max()) if np.isfinite(diff).all() and diff.max() > 0 else 1.0
    rows = []
    for r, c, d in zip(ref, cand, diff):
        tiles = [np.clip((_image(r) - lo) / span, 0, 1), np.clip((_image(c) - lo) / span, 0, 1),
                 np.clip(np.nan_to_num(_image(d), nan=dmax) / dmax, 0, 1)]
        gap = np.ones((tiles[0].shape[0], pad) + tiles[0].shape[2:])
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
        rows.append(np.ones((pad,) + rows[-1].shape[1:]))
    return (np.concatenate(rows[:-1]) * 255).round().astype(np.uint8)


def save_grid(path, ref: np.ndarray, cand: np.ndarray) -> Path:
    """PNG of `grid(ref, cand)` at `path` (samples [N, C, H, W])."""
    return write_png(path, grid(ref, cand))


def image_grid(ref: np.ndarray, cand: np.ndarray, pad: int = 2) -> np.ndarray:
    """One row per image: reference | candidate, 8-bit [N, H, W, 3] pixels unchanged (NaN black), white gaps of `pad`."""
    ref, cand = (np.nan_to_num(np.asarray(a, np.float64), nan=0.0).clip(0, 255).astype(np.uint8) for a in (ref, cand))
    n, h, w = ref.shape[:3]
    out = np.full((n * h + (n - 1) * pad, 2 * w + pad) + ref.shape[3:], 255, np.uint8)
    for i in range(n):
        y = i * (h + pad)
        out[y:y + h, :w], out[y:y + h, w + pad:] = ref[i], cand[i]
    return out


def save_image_grid(path, ref: np.ndarray, cand: np.ndarray) -> Path:
    """PNG of `image_grid(ref, cand)` at `path` (decoded images [N, H, W, 3], levels 0..255)."""
    return write_png(path, image_grid(ref, cand))
