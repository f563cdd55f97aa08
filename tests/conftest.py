"""Suite-wide setup. Without CUDA, Triton kernels run through Triton's interpreter (set before triton loads).

`slow` marks every test that starts a Python subprocess (see pyproject.toml); multi-process tests (`distributed`,
`cluster`) are slow by definition, so one that forgets the mark gets it here and `make test-fast` stays fast.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            item.get_closest_marker("distributed") or item.get_closest_marker("cluster")
        ) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def console():
    """The library's messages printed as a command prints them (`reformer-train: warning: ...` on stderr)."""
    from reformer_dist import console as console_module

    log = console_module.setup("reformer-train")
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel("NOTSET")
