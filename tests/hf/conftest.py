import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread per xdist worker is fastest (2 workers on 2 cores)."""
    torch.set_num_threads(1)
    from transformers.utils import logging
    logging.set_verbosity_error()
