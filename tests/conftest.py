"""Shared fixtures (the helpers themselves live in tests/helpers.py)."""

from __future__ import annotations

import pytest
from helpers import tiny_model
from torch import nn


@pytest.fixture
def tiny() -> nn.Module:
    """A randomised 64-px levit_tiny in eval mode (a new one per test)."""
    return tiny_model(seed=1)
