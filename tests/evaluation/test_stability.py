"""The stability probes against direct computations: two forwards in two precisions for the
divergence, and a linear recurrence whose Lyapunov exponent is known for the perturbation probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig

from mamba_ft.evaluation.stability import (model_perturbation_growth, perturbation_growth,
                                            precision_divergence)
from mamba_ft.models import load_model, mixers


def tiny_mamba():
    config = MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2,
                         expand=2, conv_kernel=4, time_step_rank=4)
    return load_model(config, need_tokenizer=False, seed=0).model.eval()


def tiny_neox():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, num_hidden_layers=2,
                                            max_position_embeddings=64)).eval()


@pytest.mark.parametrize("build", [tiny_mamba, tiny_neox], ids=["mamba", "gpt_neox"])
@pytest.mark.parametrize("how", ["autocast", "weights"])
def test_divergence_equals_two_forwards_compared_directly(build, how):
    model = build()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    result = precision_divergence(model, ids, "bf16", how)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(input_ids=ids).logits.double()
        else:
            import copy

            low = copy.deepcopy(model).to(torch.bfloat16)(input_ids=ids).logits.double()
    kl = F.kl_div(F.log_softmax(low, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="none").sum(-1).mean(0)
    rel = ((low - ref).norm(dim=-1) / ref.norm(dim=-1)).mean(0)
    # Same numbers computed two ways in float64 (as the probe computes them: in float32 a KL
    # this small is off by up to tens of percent): only summation order differs.
    torch.testing.assert_close(torch.tensor(result.kl, dtype=torch.float64), kl, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.tensor(result.logit_rel_error, dtype=torch.float64), rel,
                               rtol=1e-6, atol=1e-12)
    assert result.summary()["mean_kl"] > 0  # bf16 does change the outputs
    if build is tiny_mamba:
        assert len(result.state_rel_error) == len(mixers(model))
        assert all(0 < e < 0.1 for e in result.state_rel_error)
    else:
        assert result.state_rel_error is None


def linear_recurrence(decays):
    """Layer k: h_k[t] = decays[k] * h_k[t-1] + input_k[t], input_0 the embeddings and
    input_k the previous layer's output; a perturbation of size eps at t leaves layer 0's
    deviation at t + s exactly eps * |a|^s, so its exponent is log|a|."""

    def hidden_states(x):
        outputs, current = [], x
        for a in decays:
            h, states = torch.zeros_like(current[:, 0]), []
            for t in range(current.shape[1]):
                h = a * h + current[:, t]
                states.append(h)
            current = torch.stack(states, 1)
            outputs.append(current)
        return outputs

    return hidden_states


@pytest.mark.parametrize("decay", [0.5, 0.9, 1.3])
def test_perturbation_probe_recovers_the_known_exponent(decay):
    embeddings = torch.randn(3, 20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    growth = perturbation_growth(linear_recurrence([decay]), embeddings, position=5, epsilon=1e-6)
    assert growth.exponent[0] == pytest.approx(math.log(decay), abs=1e-6)
    assert growth.deviation[0][0] == pytest.approx(1.0, rel=1e-6)  # eps in, eps out at t
    assert (growth.exponent[0] < 0) == (decay < 1)


def test_a_stable_layer_after_an_unstable_one_inherits_the_growth():
    embeddings = torch.randn(2, 40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    growth = perturbation_growth(linear_recurrence([1.2, 0.5]), embeddings, position=0, epsilon=1e-6)
    # The second layer's deviation sums the first's, so it grows at the first's rate in the end.
    assert growth.exponent[0] == pytest.approx(math.log(1.2), abs=1e-6)
    assert math.log(1.2) - 0.05 < growth.exponent[1] < math.log(1.2) + 0.05
    assert growth.summary()["largest_exponent"] == pytest.approx(max(growth.exponent))


@pytest.mark.parametrize("build", [tiny_mamba, tiny_neox], ids=["mamba", "gpt_neox"])
def test_model_probe_equals_two_forwards_of_the_model(build):
    model = build()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    growth = model_perturbation_growth(model, ids, position=4, epsilon=1e-3, seed=3)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        direction = torch.randn(2, emb.shape[-1], generator=torch.Generator().manual_seed(3))
        moved = emb.clone()
        moved[:, 4] += 1e-3 * direction / direction.norm(dim=-1, keepdim=True)
        base = model(inputs_embeds=emb, output_hidden_states=True).hidden_states[-1]
        shifted = model(inputs_embeds=moved, output_hidden_states=True).hidden_states[-1]
    direct = (shifted[:, 4:] - base[:, 4:]).double().norm(dim=-1).mean(0) / 1e-3
    torch.testing.assert_close(torch.tensor(growth.deviation[-1], dtype=torch.float64), direct,
                               rtol=1e-4, atol=1e-6)
    # Nothing before the perturbed position moves (causality), so the first entry is the
    # perturbed position itself and every exponent is finite.
    assert all(e is not None and math.isfinite(e) for e in growth.exponent)


def test_stability_command_writes_the_report_and_refuses_bad_input(tmp_path, capsys):
    import json

    from mamba_ft.cli import main

    out = tmp_path / "stab"
    args = ["stability", "--model", "bundled:tiny-mamba", "--model", "neox=bundled:tiny-gpt-neox",
            "--rows", "2", "--length", "32", "--precisions", "bf16", "--how", "autocast",
            "--position", "4", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "stability.json").read_text())
    assert set(report["models"]) == {"tiny-mamba", "neox"}
    mamba = report["models"]["tiny-mamba"]
    assert len(mamba["divergence"]) == 1 and len(mamba["divergence"][0]["kl"]) == 32
    assert len(mamba["perturbation"]["deviation"][0]) == 32 - 4
    assert report["models"]["neox"]["divergence"][0]["state_rel_error"] is None
    for name in ("stability.md", "kl_by_position.png", "perturbation.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()

    for bad, says in [(["--out", str(out)], "already holds stability results"),
                      (["--precisions", "fp8"], "Unknown precision 'fp8'"),
                      (["--how", "both"], "Unknown --how 'both'"),
                      (["--length", "100000"], "fewer than --rows x --length")]:
        trial = args[:-2] + ["--out", str(tmp_path / "other")] + bad
        assert main(trial) == 2, bad
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
