import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Re-pin one intra-op thread before every test: accelerate may change the count when a
    trainer is built, and the root conftest pins it only once per module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
