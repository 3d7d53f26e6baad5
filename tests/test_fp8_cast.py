"""FP8.cast's vectorized float32 -> E4M3FN path (formats.fp8.e4m3_codes) gives the bytes that the ml_dtypes cast it
replaced gives, `np.clip(x, -448, 448).astype(float8_e4m3fn)`, for every float32: grid points, midpoints and their
neighbours (ties to even, the carry into the next binade), subnormals on both sides, saturation, ±0, ±inf, NaN."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxopt.formats import fp8
from onnxopt.formats.fp8 import FP8_E4M3

E4M3 = ml_dtypes.float8_e4m3fn


def reference(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.clip(x, -448, 448).astype(E4M3).view(np.uint8)


def assert_same(x: np.ndarray) -> None:
    x = np.asarray(x, np.float32)
    got = FP8_E4M3.cast(x)
    assert got.dtype == E4M3 and got.shape == x.shape
    want = reference(x)
    bad = np.flatnonzero(got.view(np.uint8).reshape(-1) != want.reshape(-1))
    assert bad.size == 0, [(hex(int(x.reshape(-1)[i].view(np.uint32))), hex(int(got.view(np.uint8).reshape(-1)[i])),
                            hex(int(want.reshape(-1)[i]))) for i in bad[:5]]


def grid() -> np.ndarray:
    """Every finite E4M3 value, ascending, -448 .. 448."""
    v = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
    return np.unique(v[np.isfinite(v)])


def with_neighbours(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))])


def test_every_e4m3_value_and_its_float32_neighbours():
    assert_same(with_neighbours(grid()))


def test_every_midpoint_and_its_float32_neighbours():
    """Ties go to the even code; one float32 step either side, away from the tie."""
    g = grid()
    mid = ((g[:-1].astype(np.float64) + g[1:]) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (g[:-1].astype(np.float64) + g[1:]) / 2)  # exact in float32
    assert_same(with_neighbours(mid))
    # beyond 448: the midpoint to the next (absent) step, 464, and far past it
    assert_same(with_neighbours(np.array([464.0, -464.0, 480.0, 1e4, -1e30, 3.4e38], np.float32)))


def test_subnormal_range_and_the_carry_into_the_smallest_normal():
    """E4M3's subnormals are k * 2^-9, k < 8; just under 2^-6 rounds up to code 8 (2^-6)."""
    k = np.arange(0, 17, dtype=np.float32)
    pts = np.concatenate([k / 512, (k + 0.5) / 512, [2.0 ** -6, 2.0 ** -10, 2.0 ** -11, 2.0 ** -20]])
    pts = with_neighbours(pts.astype(np.float32))
    assert_same(np.concatenate([pts, -pts]))
    dense = np.linspace(0, 2.0 ** -5, 100_003, dtype=np.float32)
    assert_same(np.concatenate([dense, -dense]))


def test_float32_subnormals_zeros_infinities_and_nans():
    tiny = np.array([1, 2, 0x7FFFFF, 0x400000], np.uint32).view(np.float32)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000],
                    np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 448.0, -448.0], np.float32)
    x = np.concatenate([tiny, -tiny, special, nans])
    assert_same(x)
    assert list(FP8_E4M3.cast(np.array([-0.0, np.inf, -np.inf], np.float32)).view(np.uint8)) == [0x80, 0x7E, 0xFE]
    assert list(FP8_E4M3.cast(nans[:2]).view(np.uint8)) == [0x7F, 0xFF]


def test_random_bit_patterns():
    """4 M seeded float32 bit patterns (all exponents, NaNs included), then 4 M in E4M3's range."""
    rng = np.random.default_rng(20261207)
    assert_same(rng.integers(0, 1 << 32, 1 << 22, dtype=np.uint64).astype(np.uint32).view(np.float32))
    b = rng.integers(0, 0x44000000, 1 << 22, dtype=np.uint32) | (rng.integers(0, 2, 1 << 22, dtype=np.uint32) << 31)
    assert_same(b.view(np.float32))


@pytest.mark.parametrize("chunk,block", [(1000, 64), (1 << 20, 1 << 16), (4096, 1000)])
def test_chunks_blocks_layouts_and_nan_blocks(monkeypatch, chunk, block):
    """Threaded chunks and vectorized blocks of any size (a ragged last one, a NaN in some) give one array."""
    monkeypatch.setattr(fp8, "CHUNK", chunk)
    monkeypatch.setattr(fp8, "BLOCK", block)
    x = (np.random.default_rng(3).standard_normal((211, 377)).astype(np.float32) * 100).T  # not contiguous
    x[5, :3] = [np.nan, 1e9, -1e9]
    x[200, 7] = -np.nan
    assert_same(x)
    assert_same(x[:1, :1])
    assert FP8_E4M3.cast(np.zeros((0, 4), np.float32)).shape == (0, 4)


def test_other_input_types_keep_the_ml_dtypes_path():
    """float64 is not rounded through float32 (that would round twice); float16 gives the same codes as float32."""
    x = np.array([1.0625 + 2.0 ** -30, 0.3, -17.3, 500.0], np.float64)  # 1.0625 + tiny: a float32 tie, not a tie here
    assert np.array_equal(FP8_E4M3.cast(x).view(np.uint8), np.clip(x, -448, 448).astype(E4M3).view(np.uint8))
    assert FP8_E4M3.cast(x).view(np.uint8)[0] != FP8_E4M3.cast(x.astype(np.float32)).view(np.uint8)[0]
    h = np.random.default_rng(5).standard_normal(1000).astype(np.float16)
    assert np.array_equal(FP8_E4M3.cast(h).view(np.uint8), reference(h.astype(np.float32)))


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=40),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)))
def test_any_float32_array(x):
    assert_same(x)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(1, 2000)))
def test_any_float32_bits(bits):
    assert_same(bits.view(np.float32))
