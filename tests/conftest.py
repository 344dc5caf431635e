"""Suite-wide test settings."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches (fusion features, pretrained towers) go to a folder of this session, never to ~/.cache."""
    before = os.environ.get("SENTILENS_CACHE")
    os.environ["SENTILENS_CACHE"] = str(tmp_path_factory.mktemp("sentilens-cache"))
    yield
    if before is None:
        os.environ.pop("SENTILENS_CACHE", None)
    else:
        os.environ["SENTILENS_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run the suite's torch work on one intra-op thread. The test models are tiny: more threads only
    add synchronisation, and on 2 cores shared with other jobs two OpenMP threads spin against each
    other (measured: a fusion ablation fixture took 116 s with 2 threads, 18 s with 1; the MLLM
    training tests ran ten times slower). Subprocesses (the demo, the served app) keep the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: start and leave this test with none set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
