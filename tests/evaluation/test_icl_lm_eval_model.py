"""The `mamba-ft` lm-eval model: scores against plain transformers, batch invariance, adapters."""

from __future__ import annotations

import logging

import pytest
import torch
from icl_tiny_models import reference, reference_greedy, reference_loglikelihood
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from mamba_ft.evaluation.lm_eval_model import MambaFTLM

# Contexts of different lengths, so batches really are padded (right for scoring, left for
# generation), in the exact format of the bundled rule tasks.
CONTEXTS = [
    "Q: abc A: cba\nQ: hello A: olleh\nQ: xyz A:",
    "Q: dog A:",
    "Q: rbe A: ebr\nQ: q A:",
    "Q: ogcyqr A: rqycgo\nQ: dzy A: yzd\nQ: jcewk A: kwecj\nQ: rbe A:",
    "Q: mn A: nm\nQ: stuv A:",
]
CONTINUATIONS = [" zyx\n", " god\n", " q\n", " ebr\n", " vuts\n", " s\n"]


def ll_requests():
    pairs = [(c, k) for c in CONTEXTS for k in CONTINUATIONS[:2]] + [(CONTEXTS[3], " x\n")]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_loglikelihood_matches_transformers_and_is_batch_invariant(tiny_mamba_dir, tiny_neox_dir):
    for directory in (tiny_mamba_dir, tiny_neox_dir):
        ref_model, tok = reference(directory)
        expected = [reference_loglikelihood(ref_model, tok, *r.args) for r in ll_requests()]
        by_batch = {}
        for batch_size in (1, 8):
            lm = MambaFTLM(pretrained=str(directory), device="cpu", batch_size=batch_size, show_progress=False)
            by_batch[batch_size] = [ll for ll, _ in lm.loglikelihood(ll_requests())]
        # Batch 1 against batch 8: right padding comes after every scored token, so only float
        # reassociation in differently shaped fp32 matmuls can differ: ~1e-7 relative per term.
        assert by_batch[1] == pytest.approx(by_batch[8], rel=1e-6, abs=1e-5)
        # Against transformers' own implementation (its Mamba mixer, not mamba-ft's), unpadded,
        # one sequence at a time: another summation order in the scan, hence 10x looser.
        assert by_batch[8] == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert len(set(round(x, 3) for x in expected)) > 5  # the requests really differ


def test_rolling_loglikelihood_is_the_document_logprob(tiny_mamba_dir):
    docs = ["Q: abc A: cba\nQ: dog A: god\n", "Q: x A: x\n", "Q: hello A: olleh\nQ: ab A: ba\n"]
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    ref_model, tok = reference(tiny_mamba_dir)
    # One window (documents far below max_length): the first token is predicted from the
    # prefix token (the tokenizer's BOS, which is its EOS), the rest from the document.
    expected = [reference_loglikelihood(ref_model, tok, tok.eos_token, d) for d in docs]
    results = {}
    for batch_size in (1, 8):
        lm = MambaFTLM(pretrained=str(tiny_mamba_dir), device="cpu", batch_size=batch_size, show_progress=False)
        results[batch_size] = lm.loglikelihood_rolling(requests)
    # Tolerances as for loglikelihood above.
    assert results[1] == pytest.approx(results[8], rel=1e-6, abs=1e-5)
    assert results[8] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def gen_requests():
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    return [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(CONTEXTS)]


@pytest.mark.seam
def test_batched_generation_equals_batch_one_and_greedy_reference(tiny_mamba_dir):
    outputs = {}
    for batch_size in (1, 8):
        lm = MambaFTLM(pretrained=str(tiny_mamba_dir), device="cpu", batch_size=batch_size, show_progress=False)
        assert lm.batched_generation_is_exact()
        outputs[batch_size] = lm.generate_until(gen_requests())
    # Left padding must not leak into the conv window or the recurrent state: the texts are
    # identical whether a context shares its batch with longer ones or not.
    assert outputs[8] == outputs[1]
    ref_model, tok = reference(tiny_mamba_dir)
    expected = [reference_greedy(ref_model, tok, c, 6, "\n") for c in CONTEXTS]
    assert outputs[1] == expected
    assert len(set(outputs[1])) > 2  # the outputs depend on the context


def test_generation_falls_back_to_batch_one_when_padding_would_leak(tiny_mamba_bias_dir, caplog):
    lm = MambaFTLM(pretrained=str(tiny_mamba_bias_dir), device="cpu", batch_size=8, show_progress=False)
    assert not lm.batched_generation_is_exact()
    with caplog.at_level(logging.WARNING):
        batched = lm.generate_until(gen_requests())
    assert "one request at a time" in caplog.text
    assert lm.batch_size == 8  # restored for scoring, where right padding stays exact
    single = MambaFTLM(pretrained=str(tiny_mamba_bias_dir), device="cpu", batch_size=1,
                       show_progress=False).generate_until(gen_requests())
    assert batched == single
    # The fallback is needed: lm-eval's plain batched generation on this model lets the bias
    # through the left padding and changes what is generated.
    assert HFLM.generate_until(lm, gen_requests()) != single


@pytest.mark.seam
def test_adapter_is_used_and_matches_the_merged_model(tiny_mamba_dir, tmp_path):
    from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters, merge_adapter_dir, save_adapters
    from mamba_ft.models import load_model

    loaded = load_model(str(tiny_mamba_dir))
    attach_adapters(loaded.model, AdapterConfig(targets=["all"], rank=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero (a no-op); give every factor a value
        for param in adapter_parameters(loaded.model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    adapter_dir = save_adapters(loaded.model, tmp_path / "adapter", base_model=str(tiny_mamba_dir))

    base = MambaFTLM(pretrained=str(tiny_mamba_dir), device="cpu", batch_size=8, show_progress=False)
    tuned = MambaFTLM(pretrained=str(tiny_mamba_dir), adapter=str(adapter_dir), device="cpu",
                      batch_size=8, show_progress=False)
    base_ll = [ll for ll, _ in base.loglikelihood(ll_requests())]
    tuned_ll = [ll for ll, _ in tuned.loglikelihood(ll_requests())]
    assert max(abs(a - b) for a, b in zip(base_ll, tuned_ll)) > 1e-2  # the adapter changes scores

    # Independent check: fold the adapter into plain weights and score with transformers.
    merged_dir = merge_adapter_dir(adapter_dir, tmp_path / "merged")
    ref_model, tok = reference(merged_dir)
    expected = [reference_loglikelihood(ref_model, tok, *r.args) for r in ll_requests()]
    assert tuned_ll == pytest.approx(expected, rel=1e-5, abs=1e-4)  # as in the first test

    # An adapter directory alone names its base model, so it is enough as `pretrained`.
    from_dir = MambaFTLM(pretrained=str(adapter_dir), device="cpu", batch_size=8, show_progress=False)
    assert [ll for ll, _ in from_dir.loglikelihood(ll_requests())] == pytest.approx(tuned_ll, abs=1e-6)


def test_in_memory_model_keeps_its_device_and_tokenizer_is_not_modified(tiny_mamba_bias_dir):
    from mamba_ft.models import load_model

    loaded = load_model(str(tiny_mamba_bias_dir))  # its tokenizer has no pad token
    assert loaded.tokenizer.pad_token_id is None
    lm = MambaFTLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, show_progress=False)
    assert lm.device == torch.device("cpu")
    assert loaded.tokenizer.pad_token_id is None  # the wrapper padded a copy
    assert lm.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
