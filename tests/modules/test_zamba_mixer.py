"""mamba-ft's Zamba mixer (Mamba-1 on heads) against transformers' `ZambaMambaMixer` on the same
weights: every gradient, and the decoding cache, which each side must be able to continue from
the other's (transformers' linear-attention cache: the conv window (batch, d_inner, width) and
the recurrent state (batch, heads, head_dim, N)).

fp32 throughout; the two scans sum in different orders, so 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.zamba.modeling_zamba import ZambaMambaMixer

from mamba_ft.models import set_recompute_ssm, swap_mixers
from mamba_ft.modules import MambaFTZambaMixer
from parity import TOL, assert_grads_match

# Touches transformers internals (the Zamba mixer and its cache): rerun on the lowest versions.
pytestmark = pytest.mark.seam



@pytest.fixture
def config():
    # 2 SSM heads of 32 channels; weights 5x transformers' default scale so the mixers matter.
    # (transformers cannot build a Zamba with a single hybrid layer: its tying needs a second.)
    return AutoConfig.for_model("zamba", vocab_size=96, hidden_size=32, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=48, num_hidden_layers=4,
                                layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
                                n_mamba_heads=2,
                                mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                                initializer_range=0.1)


def pair(config):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for m in hf.modules():
            if isinstance(m, ZambaMambaMixer):
                m.D.normal_()
    ft = copy.deepcopy(hf)
    assert swap_mixers(ft) == config.num_hidden_layers
    return hf, ft


def test_swapped_mixers_hold_transformers_tensors_per_head(config):
    hf, ft = pair(config)
    mixer = ft.model.layers[0].mamba
    assert type(mixer) is MambaFTZambaMixer and (mixer.n_heads, mixer.head_dim) == (2, 32)
    assert list(hf.state_dict()) == list(ft.state_dict())
    for (name, a), b in zip(hf.state_dict().items(), ft.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), name
    assert mixer.x_proj_weight.shape == (2, 4 + 2 * 8, 32) and mixer.A_log.shape == (2, 32, 8)


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
def test_logits_and_every_gradient_match_transformers(config, recompute):
    hf, ft = pair(config)
    set_recompute_ssm(ft, recompute)
    ids = torch.randint(3, 96, (2, 23), generator=torch.Generator().manual_seed(1))
    out_hf, out_ft = hf(ids, labels=ids), ft(ids, labels=ids)
    torch.testing.assert_close(out_ft.logits, out_hf.logits, **TOL)
    out_hf.loss.backward()
    out_ft.loss.backward()
    assert_grads_match(hf, ft)


def _mixers(config):
    hf, ft = pair(config)
    return hf.model.layers[0].mamba.eval(), ft.model.layers[0].mamba.eval()


def _states(cache, layer_idx=0):
    return cache.get_conv_state(layer_idx).clone(), cache.get_recurrent_state(layer_idx).clone()


@pytest.mark.parametrize("prefill_by", ["transformers", "mamba-ft"])
def test_each_decodes_from_the_others_cache(config, prefill_by):
    """A prompt through one implementation's mixer fills the cache; the other continues from
    it one token at a time. Outputs and the cache after each step equal those of
    transformers alone."""
    hf, ft = _mixers(config)
    x = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(2))
    first, then = (hf, ft) if prefill_by == "transformers" else (ft, hf)
    with torch.no_grad():
        ref_cache, mixed_cache = DynamicCache(config=config), DynamicCache(config=config)
        # The cache positionally: transformers 5.23 names it `cache_params`, 5.24+ `cache`.
        ref = [hf(x[:, :6], ref_cache)]
        mixed = [first(x[:, :6], mixed_cache)]
        for a, b in zip(_states(mixed_cache), _states(ref_cache)):
            torch.testing.assert_close(a, b, **TOL)
        assert _states(mixed_cache)[1].shape == (2, 2, 32, 8)  # (batch, heads, head_dim, N)
        for t in range(6, 9):
            ref.append(hf(x[:, t:t + 1], ref_cache))
            mixed.append(then(x[:, t:t + 1], mixed_cache))
            for a, b in zip(_states(mixed_cache), _states(ref_cache)):
                torch.testing.assert_close(a, b, **TOL)
        # The token count too (what a linear-attention layer reports differs between releases).
        assert mixed_cache.get_seq_length() == ref_cache.get_seq_length()
    torch.testing.assert_close(torch.cat(mixed, 1), torch.cat(ref, 1), **TOL)


def test_chunked_prefill_continues_the_recurrent_state(config):
    """Prompt in two chunks, then one token: mamba-ft's mixer equals its own full forward (the
    second chunk starts from the cached conv window and recurrent state)."""
    _, ft = _mixers(config)
    x = torch.randn(2, 13, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ft(x)
        cache = DynamicCache(config=config)
        parts = [ft(x[:, :7], cache=cache), ft(x[:, 7:12], cache=cache), ft(x[:, 12:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
