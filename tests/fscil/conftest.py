"""FSCIL test setup: registers the tiny procedural dataset (see ``fscil_helpers``) and runs single-threaded.

The tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP pool waiting for a busy
core makes every small matmul take milliseconds.
"""

import fscil_helpers  # noqa: F401  (registers the fscil_toy dataset)
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
