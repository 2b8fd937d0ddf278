"""Shared test settings: one deterministic hypothesis profile for CI and local runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from .distributed import RankPools

# derandomize: the same examples on every run (CI is deterministic); no example
# database, so a local failure cannot change what CI sees.
settings.register_profile(
    "flexmoe",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# explore: fresh random examples on every run (tests that set max_examples keep it); run it
# before trusting a change to the core (`bash scripts/test.sh --hypothesis-profile=explore`);
# CI keeps the fixed profile.
settings.register_profile(
    "explore",
    parent=settings.get_profile("flexmoe"),
    derandomize=False,
    max_examples=500,
)
settings.load_profile("flexmoe")

# Small tensors: extra threads cost more than they save on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture
def two_threads():
    """PyTorch's intra-op threads set to 2 for the test (the suite runs on 1), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rank_pools():
    """Gloo process groups kept for the session (one per world size): ``rank_pools.run(fn, W, *args)``."""
    pools = RankPools()
    yield pools
    pools.close()
