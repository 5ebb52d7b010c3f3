"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny GEMMs: one torch thread avoids OpenMP spinning on a loaded (CI) machine."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
