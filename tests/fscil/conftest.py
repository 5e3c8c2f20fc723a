"""FSCIL test setup: registers the tiny procedural dataset (see ``fscil_helpers``) and runs single-threaded.

The tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP pool waiting for a busy
core makes every small matmul take milliseconds.
"""

import fscil_helpers  # noqa: F401  (registers the fscil_toy dataset)
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs on one torch thread (``one_thread`` in tests/conftest.py)."""
