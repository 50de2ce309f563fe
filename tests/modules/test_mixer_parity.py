"""mamba-ft's mixer against transformers' own pure-PyTorch MambaMixer on the same weights.

Both compute in fp32; they differ only in summation order (chunked scan vs step loop), so
logits and every gradient agree to 1e-5, the bound the core issue sets.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer

from mamba_ft.modules.mamba_mixer import MambaFTMixer
from mamba_ft.models import document_starts, swap_mixers
from parity import TOL, assert_grads_match

# Touches transformers / PEFT internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam



def pair(config):
    hf = MambaForCausalLM(config).float()
    ft = copy.deepcopy(hf)
    assert swap_mixers(ft) == config.num_hidden_layers
    return hf, ft


def test_swap_replaces_every_mixer_and_keeps_state_dict(tiny_mamba_config):
    hf, ft = pair(tiny_mamba_config)
    assert not any(isinstance(m, MambaMixer) for m in ft.modules())
    assert sum(isinstance(m, MambaFTMixer) for m in ft.modules()) == tiny_mamba_config.num_hidden_layers
    assert list(hf.state_dict()) == list(ft.state_dict())
    assert [n for n, _ in hf.named_parameters()] == [n for n, _ in ft.named_parameters()]
    for (name, a), b in zip(hf.state_dict().items(), ft.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_logits_and_every_gradient_match_transformers(tiny_mamba_config):
    hf, ft = pair(tiny_mamba_config)
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (3, 41))
    out_hf, out_ft = hf(ids, labels=ids), ft(ids, labels=ids)
    torch.testing.assert_close(out_ft.logits, out_hf.logits, **TOL)
    out_hf.loss.backward()
    out_ft.loss.backward()
    assert_grads_match(hf, ft)


def test_padding_mask_matches_transformers(tiny_mamba_config):
    hf, ft = pair(tiny_mamba_config)
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    torch.testing.assert_close(ft(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, **TOL)


def test_cached_decoding_equals_full_forward_and_transformers(tiny_mamba_config):
    hf, ft = pair(tiny_mamba_config)
    hf.eval(), ft.eval()
    prompt = torch.randint(0, tiny_mamba_config.vocab_size, (2, 7))
    gen_ft = ft.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    gen_hf = hf.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(gen_ft.sequences, gen_hf.sequences)
    # The logits each cached step produced equal a fresh full-sequence forward.
    with torch.no_grad():
        full = ft(gen_ft.sequences).logits
    for step, logits in enumerate(gen_ft.logits):
        torch.testing.assert_close(logits, full[:, prompt.shape[1] - 1 + step], **TOL)


def test_chunked_prefill_carries_both_states(tiny_mamba_config):
    from transformers import DynamicCache

    _, ft = pair(tiny_mamba_config)
    ft.eval()
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (2, 15))
    with torch.no_grad():
        full = ft(ids).logits
        cache = DynamicCache(config=ft.config)
        first = ft(ids[:, :6], cache_params=cache, use_cache=True).logits
        second = ft(ids[:, 6:], cache_params=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, **TOL)


def test_document_starts_isolate_packed_documents(tiny_mamba_config):
    _, ft = pair(tiny_mamba_config)
    docs = [torch.randint(0, tiny_mamba_config.vocab_size, (1, n)) for n in (5, 9, 4)]
    packed = torch.cat(docs, dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 5, 14]] = True
    with document_starts(ft, starts):
        logits = ft(packed).logits
    separate = torch.cat([ft(doc).logits for doc in docs], dim=1)
    torch.testing.assert_close(logits, separate, **TOL)
    # Outside the block the documents see each other again.
    assert not torch.allclose(ft(packed).logits, separate, **TOL)


def test_saved_model_loads_in_plain_transformers(tiny_mamba_config, tmp_path):
    hf, ft = pair(tiny_mamba_config)
    with torch.no_grad():
        ft.backbone.layers[0].mixer.D.add_(0.5)  # make the saved weights differ from hf's
    ft.save_pretrained(tmp_path)
    plain = MambaForCausalLM.from_pretrained(tmp_path)
    assert any(isinstance(m, MambaMixer) for m in plain.modules())
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (1, 10))
    torch.testing.assert_close(plain(ids).logits, ft(ids).logits, **TOL)


def test_recomputed_ssm_branch_gives_the_same_gradients_and_saves_less(tiny_mamba_config):
    """`set_recompute_ssm` changes what the backward stores, not what it computes.

    Checked with packed documents and adapters on every target, the two things the
    recomputation must see again in the backward. Same ops in the same order: bit-for-bit
    equal results are expected; 1e-6 leaves room for nothing but a reordered sum.
    """
    from torch.autograd.graph import saved_tensors_hooks

    from mamba_ft.adapters import AdapterConfig, attach_adapters
    from mamba_ft.models import set_recompute_ssm

    _, plain = pair(tiny_mamba_config)
    attach_adapters(plain, AdapterConfig(targets=["all"], rank=4))
    for p in plain.parameters():  # adapters start at B = 0; give every path a gradient
        p.data.add_(torch.randn_like(p) * 0.01)
    recomputed = copy.deepcopy(plain)
    assert set_recompute_ssm(recomputed, True) == tiny_mamba_config.num_hidden_layers
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (2, 40))
    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[:, [0, 17]] = True

    def run(model):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with document_starts(model, starts), saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        with document_starts(model, starts):
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss, grads, sum(saved)

    loss_a, grads_a, saved_a = run(plain)
    loss_b, grads_b, saved_b = run(recomputed)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert saved_b < saved_a
