import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run these tiny float64 problems on one thread.

    On a shared 2-core machine, intra-op threads spinning on tensors of a few hundred entries
    made products 20-100x slower than on one thread. Restored after each module.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
