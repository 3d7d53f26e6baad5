"""The real diffusion model of the tests: adaptive-terrain-diffusion's consistency UNet (dev extra), skipped when absent."""
from pathlib import Path

import pytest

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002  # terrain_diffusion.TerrainGenerator's EDM constants


def terrain_unet() -> str:
    """Path of the bundled ONNX consistency UNet (noisy [b,1,128,128], sigma [b], difficulty [b] -> denoised)."""
    td = pytest.importorskip("terrain_diffusion", reason="adaptive-terrain-diffusion is not installed (pip install -e '.[dev]')")
    path = Path(td.__file__).parent / "weights" / "terrain_consistency_unet_difficulty100.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed package")
    return str(path)
