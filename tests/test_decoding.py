"""`mamba_ft.decoding.Decoder` against plain transformers' `generate` on the same weights.

The reference is transformers' `generate`: greedy tokens identical to the plain transformers
model's (its own mixers and cache), ended rows padded and decoding stopped as it does, and
sampled tokens identical to `generate`'s on the same model under the same seed. The CUDA-graph replay is checked on the GPU
against the same loop run eagerly (identical tokens and logits: the same kernels in the same
order). The graph needs the cache's tensors to keep their addresses and the decoder to put
back every tensor its warm-up steps advanced: both are checked here on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconMambaConfig

from mamba_ft.decoding import (Decoder, cache_tensors, output_cache,
                               token_chooser, why_generate_decodes)
from mamba_ft.models import load_model

# Drives transformers' cache and generate from outside: rerun on the lowest versions.
pytestmark = pytest.mark.seam


def falcon_mamba_config():
    return FalconMambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2,
                             expand=2, conv_kernel=4, mixer_rms_eps=1e-6, eos_token_id=2,
                             pad_token_id=0)


@pytest.fixture(params=["mamba", "mamba2", "falcon_mamba"])
def pair(request, tiny_mamba_config, tiny_mamba2_config, tmp_path):
    """(plain transformers model, mamba-ft's model on the same weights), fp32, eval. Weights
    at 0.3 scale: at transformers' 0.02 the logits are nearly flat and greedy ties decide."""
    config = {"mamba": tiny_mamba_config, "mamba2": tiny_mamba2_config,
              "falcon_mamba": falcon_mamba_config()}[request.param]
    config.initializer_range = 0.3
    config.eos_token_id, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path), need_tokenizer=False).model.eval()
    return plain, ours


def prompts(batch=3, length=7):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(1))


def plain_generate(model, ids, new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, pad_token_id=0, **kwargs)


def test_greedy_tokens_equal_generate(pair):
    plain, ours = pair
    ids = prompts()
    expected = plain_generate(plain, ids, 12, do_sample=False, eos_token_id=None)
    got = Decoder(ours).generate(ids, 12, token_chooser(ours))
    assert torch.equal(got, expected)
    assert len(set(got[:, ids.shape[1]:].flatten().tolist())) > 3  # not one repeated token


def test_ended_rows_are_padded_and_decoding_stops_as_generate_does(pair):
    """The end-of-sequence token is chosen as one a row produces early: that row is padded from
    then on, and the other rows decide when decoding stops."""
    plain, ours = pair
    ids = prompts()
    free = Decoder(ours).generate(ids, 12, token_chooser(ours))
    eos = int(free[0, ids.shape[1] + 2])
    expected = plain_generate(plain, ids, 12, do_sample=False, eos_token_id=eos)
    got = Decoder(ours).generate(ids, 12, token_chooser(ours), eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == 0).all()


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9),
                                     dict(top_k=0, top_p=0.5)],
                         ids=["config-defaults", "all-warpers", "top-p-only"])
def test_sampled_tokens_equal_generate_under_one_seed(pair, options):
    """`generate` drives mamba-ft's own model here: a sample near a boundary of the cumulative
    distribution flips with a 1e-6 change of the logits, which plain transformers' Mamba-2
    (another summation order) makes; the greedy tests compare against it."""
    _, ours = pair
    ids = prompts()
    torch.manual_seed(5)
    expected = plain_generate(ours, ids, 10, do_sample=True, eos_token_id=None, **options)
    torch.manual_seed(5)
    got = Decoder(ours).generate(ids, 10, token_chooser(ours, sample=True, **options))
    assert torch.equal(got, expected)
    torch.manual_seed(6)
    assert not torch.equal(Decoder(ours).generate(ids, 10, token_chooser(ours, sample=True,
                                                                          **options)), got)


def test_a_step_keeps_the_state_addresses_and_the_saved_state_restores_it(pair):
    """What replaying the step as a CUDA graph stands on: transformers' cache writes the new
    state into the same tensors, and `cache_tensors` holds every tensor a step changes, so
    putting them back makes the next step repeat exactly."""
    _, ours = pair
    ids = prompts()
    with torch.no_grad():
        cache = output_cache(ours(input_ids=ids, use_cache=True))
        state = cache_tensors(cache)
        addresses = [t.data_ptr() for t in state]
        saved = [t.clone() for t in state]
        decoder = Decoder(ours)
        step_ids = ids[:, -1:].clone()
        first = decoder._forward(step_ids, cache)
        assert [t.data_ptr() for t in cache_tensors(cache)] == addresses
        assert any(not torch.equal(t, s) for t, s in zip(state, saved))  # the step moved it
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        assert torch.equal(decoder._forward(step_ids, cache), first)


def test_hybrids_and_extra_generation_options_are_left_to_generate(pair, tiny_mamba_config):
    _, ours = pair
    assert why_generate_decodes(ours) is None
    ours.generation_config.repetition_penalty = 1.3
    assert why_generate_decodes(ours) is not None
    from transformers import BambaConfig

    hybrid = load_model(BambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                    attn_layer_indices=[1], num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48,
                                    mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
                                    mamba_d_state=8, mamba_chunk_size=8),
                        need_tokenizer=False, seed=0).model
    assert why_generate_decodes(hybrid) is not None
    assert why_generate_decodes(hybrid) == ("Bamba has attention layers, whose cache grows "
                                            "each token")
    assert why_generate_decodes(ours) == ("the model's generation config sets "
                                          "repetition_penalty, which generate applies")
    with pytest.raises(ValueError, match="not a pure Mamba model"):
        Decoder(hybrid)
    transformer = load_model(dict(model_type="gpt_neox", vocab_size=96, hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64),
                             need_tokenizer=False, allow_transformers=True, seed=0).model
    assert why_generate_decodes(transformer) == ("'gpt_neox' is not a Mamba model: its attention "
                                                 "cache grows each token")


def test_cuda_graph_needs_a_cuda_model(pair):
    with pytest.raises(ValueError, match="CUDA device"):
        Decoder(pair[1], cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_the_eager_loop(model_type, dtype, tiny_mamba_config,
                                                 tiny_mamba2_config):
    """Through the Triton decode kernels: replaying the captured step gives the eager loop's
    tokens and final logits exactly (the same kernels in the same order), greedy and sampled
    under one seed, and a second generate call (a new cache, a new capture) does too."""
    config = {"mamba": tiny_mamba_config, "mamba2": tiny_mamba2_config}[model_type]
    config.initializer_range = 0.3
    model = load_model(config, need_tokenizer=False, seed=0, dtype=dtype).model.cuda().eval()
    ids = prompts(batch=4).cuda()
    graphed, eager = Decoder(model), Decoder(model, cuda_graph=False)
    assert graphed.cuda_graph
    for sample in (False, True):
        choose = token_chooser(model, sample=sample, top_k=30)
        torch.manual_seed(0)
        a = graphed.generate(ids, 40, choose)
        torch.manual_seed(0)
        b = eager.generate(ids, 40, choose)
        assert torch.equal(a, b)
    assert torch.equal(graphed.generate(ids[:2], 20, token_chooser(model)),
                       eager.generate(ids[:2], 20, token_chooser(model)))


def test_left_padded_prompts_decode_as_generate_does(pair):
    """A batch of prompts of different lengths, padded on the left with a mask: the prefill
    keeps the padding out of the state, and the tokens are plain transformers'."""
    plain, ours = pair
    ids = prompts(batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :2] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = plain_generate(plain, ids, 10, do_sample=False, eos_token_id=None,
                              attention_mask=mask)
    got = Decoder(ours).generate(ids, 10, token_chooser(ours), attention_mask=mask)
    assert torch.equal(got, expected)
