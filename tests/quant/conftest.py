"""Shared setup for the quantization core tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so thresholds are reproducible."""
    torch.manual_seed(0)
