"""Command line: parses options and calls the Python API. User errors print one line and exit 2."""
from __future__ import annotations

from . import analysis, calib_data, engines, quantize, sparsify  # noqa: F401  (each registers its commands on `main`)
from .common import verbosity_after_command, main



def _every_command(group):
    for cmd in group.commands.values():
        yield cmd
        if hasattr(cmd, "commands"):   # a group's subcommands (calib-data sdxl|trajectory) take -v/-q too
            yield from _every_command(cmd)


for _cmd in list(_every_command(main)):
    verbosity_after_command(_cmd)

__all__ = ["main"]

if __name__ == "__main__":
    main()
