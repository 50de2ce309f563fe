"""Fixtures for the ICL evaluation tests: the bundled tiny models, and a random Mamba variant."""

from __future__ import annotations

import pytest

from icl_tiny_models import save_tiny_mamba

from mamba_ft.models.loading import BUNDLED_DIR

try:  # lm-eval is the `eval` / `dev` extra; without it these tests are not collected
    import lm_eval  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_icl_*.py"]


@pytest.fixture(scope="session")
def tiny_mamba_dir():
    # Trained on the rule corpus (mamba_ft/bundled/), so its outputs depend on the context.
    return BUNDLED_DIR / "tiny-mamba"


@pytest.fixture(scope="session")
def tiny_neox_dir():
    return BUNDLED_DIR / "tiny-gpt-neox"


@pytest.fixture(scope="session")
def tiny_mamba_bias_dir(tmp_path_factory):
    return save_tiny_mamba(tmp_path_factory.mktemp("tiny_mamba_bias"), seed=2, in_proj_bias=True)



@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The models here are tiny: with several threads on a small shared CPU, OpenMP spin-waiting
    # costs several times the work itself (measured: 50 s against 14 s for the CLI sweep test).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
