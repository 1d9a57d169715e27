import pytest

from .cnn import tiny_cnn as build_tiny_cnn


@pytest.fixture(scope="module")
def tiny_cnn():
    return build_tiny_cnn()
