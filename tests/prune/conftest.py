import pytest
from prune_helpers import tiny_data, tiny_model


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def data():
    return tiny_data()
