"""Test setup: offline switches before any hub library is imported, few threads, deterministic defaults."""

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PL_DISABLE_FORK": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_cwd():
    """Tests that ``chdir`` into their tmp_path must not move the tests after them (relative task paths)."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): the folders that train several small models in one test ask
    for it, since spin-waiting OpenMP threads slow them down on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
