import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests (tests/fuzz): a small example budget for `make test`, a large one for
# `make test-all` (HYPOTHESIS_PROFILE=thorough). No deadline: the machine is shared and busy.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("fast", max_examples=10, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run the suite's small problems on one intra-op thread.

    On a shared 2-core machine, intra-op threads spinning on tensors of a few hundred entries
    made products 20-100x slower than on one thread. Restored after each module.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
