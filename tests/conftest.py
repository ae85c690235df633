import os

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
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda_items and os.environ.get("TOPODERIV_REQUIRE_CUDA") == "1":
        # scripts/gpu_check.sh: on a GPU machine, CUDA tests must run, not pass by being skipped
        raise pytest.UsageError("TOPODERIV_REQUIRE_CUDA=1 but CUDA tests cannot run: torch.cuda.is_available() = "
                                f"{torch.cuda.is_available()} and this topoderiv build must have CUDA kernels")
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a topoderiv build with CUDA kernels")
    for item in cuda_items:  # the marker, not keywords (a folder named "cuda" is a keyword too)
        item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the wall clock (fresh inputs each run), seed printed."""
    import time
    seed = int(time.time_ns() % (2**31))
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): tiny problems are fastest on one thread, and a
    thread pool on a busy machine is slow. Used per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
