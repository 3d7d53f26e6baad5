import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    try:
        import tensorrt  # noqa: F401
        have_trt = True
    except Exception:
        have_trt = False
    skip = pytest.mark.skip(reason="tensorrt is not importable here (install the trt extra on a GPU machine)")
    for item in items:
        if "trt" in item.keywords and not have_trt:
            item.add_marker(skip)
