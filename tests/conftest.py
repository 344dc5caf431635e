"""Suite-wide test settings."""

import pytest
import torch


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
