"""Command line: parses options and calls the Python API. User errors print one line and exit 2."""
from __future__ import annotations

from . import analysis, data, engines, quantize, sparsify  # noqa: F401  (each registers its commands on `main`)
from .common import verbosity_after_command, main

for _cmd in list(main.commands.values()):
    verbosity_after_command(_cmd)
verbosity_after_command(data.calib_data_sdxl)

__all__ = ["main"]

if __name__ == "__main__":
    main()
