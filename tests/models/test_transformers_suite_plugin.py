"""The transformers-suite plugin (tests/transformers_suite/plugin.py) swaps what it should.

Checked without transformers' test tree: with the plugin's patch on, models that plain
transformers builds or loads hold only mamba-ft mixers and norms, and give the logits of a
plain transformers model with the same state dict.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import MambaForCausalLM, MambaModel
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm

from mamba_ft.modules.mamba_mixer import MambaFTMixer
from mamba_ft.modules import MambaFTRMSNorm

# Touches transformers / PEFT internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam

PLUGIN = Path(__file__).resolve().parents[1] / "transformers_suite" / "plugin.py"


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("mamba_ft_transformers_suite_plugin", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.uninstall()


@pytest.fixture
def patched(plugin):
    plugin.install()
    try:
        yield plugin
    finally:
        plugin.uninstall()


def _kinds(model):
    return {type(m) for m in model.modules()}


def _input_ids(vocab_size):
    return torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def test_built_model_is_all_mamba_ft_and_matches_transformers(patched, tiny_mamba_config):
    ours = MambaForCausalLM(tiny_mamba_config).eval()
    kinds = _kinds(ours)
    assert MambaMixer not in kinds and MambaRMSNorm not in kinds
    assert sum(isinstance(m, MambaFTMixer) for m in ours.modules()) == 2
    # One norm per block and the final norm.
    assert sum(isinstance(m, MambaFTRMSNorm) for m in ours.modules()) == 3
    assert all(isinstance(layer.mixer, MambaFTMixer) for layer in ours.backbone.layers)
    assert patched.is_mamba_ft(ours)

    patched.uninstall()
    theirs = MambaForCausalLM(tiny_mamba_config).eval()
    assert MambaMixer in _kinds(theirs) and MambaFTMixer not in _kinds(theirs)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())

    ids = _input_ids(tiny_mamba_config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_loaded_and_base_models_are_swapped(patched, tiny_mamba_config, tmp_path):
    backbone = MambaModel(tiny_mamba_config)
    assert patched.is_mamba_ft(backbone)

    patched.uninstall()
    plain = MambaForCausalLM(tiny_mamba_config).eval()
    plain.save_pretrained(tmp_path)
    patched.install()

    loaded = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert patched.is_mamba_ft(loaded)
    ids = _input_ids(tiny_mamba_config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


def test_uninstall_restores_transformers(plugin, tiny_mamba_config):
    plugin.install()
    plugin.uninstall()
    assert not plugin.installed()
    assert not plugin.is_mamba_ft(MambaForCausalLM(tiny_mamba_config))


def test_self_check_passes(patched):
    patched.self_check()
