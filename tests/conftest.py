import pytest
import torch


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from topoderiv.ops import has_cuda_kernels
        return has_cuda_kernels()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a topoderiv build with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the wall clock (fresh inputs each run), seed printed."""
    import time
    seed = int(time.time_ns() % (2**31))
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)
