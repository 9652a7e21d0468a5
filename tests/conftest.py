"""Fixtures shared by every test folder. Helpers live in plain modules beside the tests
that use them (e.g. tests/ops/cases.py), not here."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state (CPU and CUDA), so failures reproduce."""
    torch.manual_seed(0)
