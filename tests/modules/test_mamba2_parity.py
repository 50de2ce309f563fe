"""mamba-ft's Mamba-2 mixer against transformers' own pure-PyTorch Mamba2Mixer, same weights.

Both compute in fp32 and differ only in summation order (transformers materialises every
chunk's (chunk, chunk) matrices for the whole sequence and chains chunk states with one more
segment-sum matrix; mamba-ft walks chunk by chunk with a recomputing backward), so logits and
every gradient agree to 1e-5 absolute and relative, the bound the Mamba-1 parity tests use
(measured differences are about 1e-7).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer, Mamba2RMSNorm

from mamba_ft.models import document_starts, mixers, set_recompute_ssm, swap_mixers, swap_norms
from mamba_ft.modules import MambaFTMamba2Mixer, MambaFTRMSNorm, MambaFTRMSNormGated
from parity import TOL, assert_grads_match

# The model's cache keyword: `cache_params` in transformers 5.23, `cache` from 5.24 on (passing
# the other name is swallowed by the model's **kwargs and the cache never reaches the mixers).
CACHE = "cache" if "cache" in inspect.signature(Mamba2ForCausalLM.forward).parameters else "cache_params"

# Touches transformers internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam



def pair(config, seed=0):
    torch.manual_seed(seed)
    hf = Mamba2ForCausalLM(config).float()
    with torch.no_grad():  # D = 1 and dt_bias at init would hide a wrong D or bias path
        for module in hf.modules():
            if isinstance(module, Mamba2Mixer):
                module.D.normal_()
                module.norm.weight.normal_(1.0, 0.2)
    ft = copy.deepcopy(hf)
    assert swap_mixers(ft) == config.num_hidden_layers
    swap_norms(ft)
    return hf, ft


def test_swap_replaces_every_mixer_and_norm_and_keeps_state_dict(tiny_mamba2_config):
    hf, ft = pair(tiny_mamba2_config)
    assert not any(isinstance(m, (Mamba2Mixer, Mamba2RMSNorm)) for m in ft.modules())
    assert len(mixers(ft)) == tiny_mamba2_config.num_hidden_layers
    assert all(isinstance(m.norm, MambaFTRMSNormGated) for m in mixers(ft))
    assert sum(isinstance(m, MambaFTRMSNorm) for m in ft.modules()) == 3  # 2 blocks + norm_f
    assert [n for n, _ in hf.named_parameters()] == [n for n, _ in ft.named_parameters()]
    for (name, a), b in zip(hf.state_dict().items(), ft.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_mixer_takes_over_the_same_parameter_objects():
    config = Mamba2Config(vocab_size=64, hidden_size=32, num_heads=8, head_dim=8, n_groups=2,
                          state_size=8, num_hidden_layers=1, chunk_size=8)
    hf_mixer = Mamba2ForCausalLM(config).backbone.layers[0].mixer
    ours = MambaFTMamba2Mixer(hf_mixer)
    for name, param in hf_mixer.named_parameters():
        assert ours.get_parameter(name) is param, name


@pytest.mark.parametrize("n_groups", [1, 2, 4])
def test_logits_and_every_gradient_match_transformers(tiny_mamba2_config, n_groups):
    tiny_mamba2_config.n_groups = n_groups
    hf, ft = pair(tiny_mamba2_config)
    ids = torch.randint(0, tiny_mamba2_config.vocab_size, (3, 21))  # 21: not a multiple of 8
    out_hf, out_ft = hf(ids, labels=ids), ft(ids, labels=ids)
    torch.testing.assert_close(out_ft.logits, out_hf.logits, **TOL)
    out_hf.loss.backward()
    out_ft.loss.backward()
    assert_grads_match(hf, ft)


def test_time_step_limit_and_biases_match_transformers():
    config = Mamba2Config(vocab_size=96, hidden_size=32, num_heads=4, head_dim=16, n_groups=2,
                          state_size=16, num_hidden_layers=2, chunk_size=16, use_bias=True,
                          time_step_limit=(0.01, 0.2))
    hf, ft = pair(config)
    ids = torch.randint(0, 96, (2, 37))
    out_hf, out_ft = hf(ids, labels=ids), ft(ids, labels=ids)
    torch.testing.assert_close(out_ft.logits, out_hf.logits, **TOL)
    out_hf.loss.backward()
    out_ft.loss.backward()
    assert_grads_match(hf, ft)


def test_padded_batch_matches_transformers(tiny_mamba2_config):
    hf, ft = pair(tiny_mamba2_config)
    ids = torch.randint(0, tiny_mamba2_config.vocab_size, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    out_hf = hf(ids, attention_mask=mask, labels=labels)
    out_ft = ft(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_ft.logits, out_hf.logits, **TOL)
    out_hf.loss.backward()
    out_ft.loss.backward()
    assert_grads_match(hf, ft)


def test_greedy_generate_matches_transformers_and_the_full_forward(tiny_mamba2_config):
    hf, ft = pair(tiny_mamba2_config)
    hf.eval(), ft.eval()
    prompt = torch.randint(3, tiny_mamba2_config.vocab_size, (2, 11))
    gen_ft = ft.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    gen_hf = hf.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(gen_ft.sequences, gen_hf.sequences)
    with torch.no_grad():
        full = ft(gen_ft.sequences).logits
    for step, (ours, theirs) in enumerate(zip(gen_ft.logits, gen_hf.logits)):
        torch.testing.assert_close(ours, theirs, **TOL)
        torch.testing.assert_close(ours, full[:, prompt.shape[1] - 1 + step], **TOL)


def test_prefill_chunked_prefill_and_steps_equal_the_full_forward(tiny_mamba2_config):
    """Prefill 6 (shorter than a chunk), continue with 11 (crossing chunks), then one-token
    steps: the cached conv window and SSD state carry over every time."""
    hf, ft = pair(tiny_mamba2_config)
    ft.eval(), hf.eval()
    ids = torch.randint(0, tiny_mamba2_config.vocab_size, (2, 20))
    with torch.no_grad():
        full = ft(ids).logits
        torch.testing.assert_close(full, hf(ids).logits, **TOL)
        for model in (ft, hf):
            cache = DynamicCache(config=model.config)
            parts = [model(ids[:, :6], **{CACHE: cache}, use_cache=True).logits,
                     model(ids[:, 6:17], **{CACHE: cache}, use_cache=True).logits]
            parts += [model(ids[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits
                      for t in range(17, 20)]
            torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def test_one_token_steps_apply_the_time_step_limit():
    """transformers' own decode step skips `time_step_limit` (its full forward clamps);
    mamba-ft's step clamps too, so cached decoding equals the full forward with a limit set."""
    config = Mamba2Config(vocab_size=96, hidden_size=32, num_heads=8, head_dim=8, n_groups=2,
                          state_size=8, num_hidden_layers=2, chunk_size=8,
                          time_step_limit=(0.05, 0.08))
    _, ft = pair(config)
    ft.eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        full = ft(ids).logits
        cache = DynamicCache(config=config)
        parts = [ft(ids[:, :9], **{CACHE: cache}, use_cache=True).logits]
        parts += [ft(ids[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def test_packed_documents_equal_the_documents_run_apart(tiny_mamba2_config):
    """Outputs, loss and every gradient: the SSD state and the conv window restart at each
    document start (the second document starts mid-chunk, the third at a chunk boundary)."""
    _, ft = pair(tiny_mamba2_config)
    apart = copy.deepcopy(ft)
    docs = [torch.randint(0, tiny_mamba2_config.vocab_size, (1, n)) for n in (5, 11, 7)]
    packed = torch.cat(docs, dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 5, 16]] = True
    with document_starts(ft, starts):
        logits = ft(packed).logits
        loss = sum(torch.nn.functional.cross_entropy(logits[0, a:b - 1], packed[0, a + 1:b],
                                                     reduction="sum")
                   for a, b in ((0, 5), (5, 16), (16, 23)))
        loss.backward()
    separate = [apart(doc).logits for doc in docs]
    loss_apart = sum(torch.nn.functional.cross_entropy(lg[0, :-1], doc[0, 1:], reduction="sum")
                     for lg, doc in zip(separate, docs))
    loss_apart.backward()
    torch.testing.assert_close(logits, torch.cat(separate, dim=1), **TOL)
    torch.testing.assert_close(loss, loss_apart, **TOL)
    assert_grads_match(apart, ft)
    # Outside the block the documents see each other again.
    with torch.no_grad():
        assert not torch.allclose(ft(packed).logits, torch.cat(separate, dim=1), **TOL)


def test_recomputed_ssm_branch_gives_the_same_gradients(tiny_mamba2_config):
    _, plain = pair(tiny_mamba2_config)
    recomputed = copy.deepcopy(plain)
    assert set_recompute_ssm(recomputed, True) == tiny_mamba2_config.num_hidden_layers
    ids = torch.randint(0, tiny_mamba2_config.vocab_size, (2, 19))
    starts = torch.zeros(2, 19, dtype=torch.bool)
    starts[:, [0, 9]] = True
    for model in (plain, recomputed):
        with document_starts(model, starts):
            model(ids, labels=ids).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_saved_model_loads_in_plain_transformers(tiny_mamba2_config, tmp_path):
    _, ft = pair(tiny_mamba2_config)
    with torch.no_grad():
        ft.backbone.layers[0].mixer.norm.weight.add_(0.5)
    ft.save_pretrained(tmp_path)
    plain = Mamba2ForCausalLM.from_pretrained(tmp_path)
    assert any(isinstance(m, Mamba2Mixer) for m in plain.modules())
    ids = torch.randint(0, tiny_mamba2_config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ft(ids).logits, **TOL)


# The forward keyword contract (tests/models/test_transformers_contract.py has the signature
# comparison for Mamba2Mixer, Mamba2RMSNormGated and Mamba2RMSNorm).

def test_every_block_call_during_generate_reaches_the_mixer_with_its_cache(tiny_mamba2_config):
    _, ft = pair(tiny_mamba2_config)
    ft.eval()
    seen: list[set[str]] = []
    hook = ft.backbone.layers[0].mixer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    ft.generate(torch.randint(3, 96, (1, 6)), max_new_tokens=3, do_sample=False)
    hook.remove()
    assert len(seen) == 3 and all("cache" in keys or "cache_params" in keys for keys in seen)


def test_output_only_keywords_pass_and_others_are_refused(tiny_mamba2_config):
    """Mamba2Block hands the model's keywords to the mixer: output requests and the loss
    normaliser mean nothing to it; packing information it does not read is an error."""
    hf, ft = pair(tiny_mamba2_config)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        out_ft = ft(ids, output_hidden_states=True, num_items_in_batch=torch.tensor(8))
        out_hf = hf(ids, output_hidden_states=True)
    assert len(out_ft.hidden_states) == len(out_hf.hidden_states)
    torch.testing.assert_close(out_ft.logits, out_hf.logits, **TOL)
    mixer = ft.backbone.layers[0].mixer
    x = torch.randn(1, 4, tiny_mamba2_config.hidden_size)
    for name in ("seq_idx", "cu_seq_lens_q", "position_ids"):
        with pytest.raises(TypeError, match=rf"{name}.*transformers {transformers.__version__}"):
            mixer(x, **{name: None})
    with pytest.raises(TypeError, match="both `cache` and `cache_params`"):
        mixer(x, cache=object(), cache_params=object())


def test_cache_under_either_name_gives_the_same_decoding(tiny_mamba2_config):
    _, ft = pair(tiny_mamba2_config)
    mixer = ft.backbone.layers[0].mixer
    x = torch.randn(2, 10, tiny_mamba2_config.hidden_size)
    with torch.no_grad():
        full = mixer(x)
        for name in ("cache", "cache_params"):
            cache = DynamicCache(config=tiny_mamba2_config)
            prefill = mixer(x[:, :9], **{name: cache})
            step = mixer(x[:, 9:], **{name: cache})
            torch.testing.assert_close(torch.cat([prefill, step], 1), full, **TOL)


def test_a_cache_that_records_past_states_is_refused(tiny_mamba2_config):
    _, ft = pair(tiny_mamba2_config)
    cache = DynamicCache(config=tiny_mamba2_config)
    cache.activate_past_recording()
    with pytest.raises(NotImplementedError, match="assisted or speculative"):
        ft.backbone.layers[0].mixer(torch.randn(1, 3, tiny_mamba2_config.hidden_size), cache)
