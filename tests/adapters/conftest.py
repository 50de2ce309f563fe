"""Fixtures for the adapter tests; the tiny models live in adapter_models.py."""

import pytest
import torch

from adapter_models import VOCAB


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
