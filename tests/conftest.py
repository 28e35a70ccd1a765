import logging
import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)
logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random FLUX.1-architecture generator (fp32, CPU). Tests must not modify its weights."""
    from pipelines import load_generator

    return load_generator("flux-tiny")


@pytest.fixture
def random_logits():
    """Random mask logits around 0 so that masks are neither all-on nor saturated."""

    def make(sites, seed=0, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        return {s.name: torch.randn(s.size, generator=g) * scale for s in sites}

    return make
