"""Fixtures for the tt backend tests (all on llm.ttnn_emu).

The emulator runs thousands of small torch ops per decode step; on the 2 shared CI cores,
intra-op threading makes each of them slower (measured ~10x on a busy box), so these tests run
torch single-threaded.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
