import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The estimators are tiny; one intra-op thread avoids oversubscribing a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
