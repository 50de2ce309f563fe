"""The ICL sweep end to end: every shot and seed, gain and ratio, fine-tuned vs base, bad input."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from icl_tiny_models import reference, reference_loglikelihood

from mamba_ft.cli import main
from mamba_ft.evaluation import ModelSpec, run_icl_sweep
from mamba_ft.evaluation.icl_task_data import TASKS_DIR
from mamba_ft.evaluation.sweep import SweepResult, _add_gains


def brute_force_zero_shot_accuracy(model_dir, task: str, limit: int) -> float:
    """acc of a plain transformers model on the first `limit` documents, by hand."""
    model, tok = reference(model_dir)
    lines = (TASKS_DIR / f"{task}.validation.jsonl").read_text().splitlines()[:limit]
    correct = 0
    for doc in map(json.loads, lines):
        scores = [reference_loglikelihood(model, tok, f"Q: {doc['query']} A:", " " + c) for c in doc["choices"]]
        correct += int(scores.index(max(scores)) == doc["label"])
    return correct / limit


def hand_gain(scores: list[dict], model: str, tasks: list[str], shots: list[int], seed: int) -> float:
    """ICL gain written out from its definition, from the raw result rows."""
    value = {(r["task"], r["shots"], r["seed"]): r["value"] for r in scores
             if r["model"] == model and r["metric"] == "acc"}
    return statistics.fmean(value[(t, k, seed)] - value[(t, 0, None)] for t in tasks for k in shots if k > 0)


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cli_sweep_writes_every_shot_and_seed(tiny_mamba_dir, tiny_neox_dir, tmp_path, capsys, no_network):
    out = tmp_path / "sweep"
    tasks = ["icl_copy", "icl_reverse"]
    rc = main(["icl", "--model", f"mamba={tiny_mamba_dir}", "--model", f"neox={tiny_neox_dir}",
               "--tasks", ",".join(tasks), "--shots", "0,1,2", "--seeds", "11,12", "--limit", "6",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    for model in ("mamba", "neox"):
        for metric in ("acc", "acc_norm"):
            got = {(r["task"], r["shots"], r["seed"]) for r in data["scores"]
                   if r["model"] == model and r["metric"] == metric}
            assert got == {(t, 0, None) for t in tasks} | {(t, k, s) for t in tasks for k in (1, 2) for s in (11, 12)}
    assert data["models"]["mamba"]["is_mamba"] and not data["models"]["neox"]["is_mamba"]
    assert data["baseline"] == "neox"  # the first Transformer

    # 0-shot scores against a brute-force evaluation with plain transformers.
    for model, directory in (("mamba", tiny_mamba_dir), ("neox", tiny_neox_dir)):
        row = next(r for r in data["scores"] if (r["model"], r["task"], r["shots"], r["metric"]) == (model, "icl_reverse", 0, "acc"))
        assert row["value"] == pytest.approx(brute_force_zero_shot_accuracy(directory, "icl_reverse", 6))

    # Gains and the ratio, recomputed from the rows by their definitions.
    for model in ("mamba", "neox"):
        per_seed = [hand_gain(data["scores"], model, tasks, [0, 1, 2], s) for s in (11, 12)]
        assert data["gains"][model]["mean"] == pytest.approx(statistics.fmean(per_seed))
        assert data["gains"][model]["std"] == pytest.approx(statistics.stdev(per_seed))
    # Both bundled models learn the rule in context (0 shots is a guess among six rules).
    assert data["gains"]["mamba"]["mean"] > 0.3 and data["gains"]["neox"]["mean"] > 0.3
    expected_ratio = data["gains"]["mamba"]["mean"] / data["gains"]["neox"]["mean"]
    assert data["ratios"]["mamba"]["ratio"] == pytest.approx(expected_ratio)

    report = (out / "results.md").read_text()
    assert "| mamba | Mamba |" in report and "| neox | Transformer | " in report
    assert "| icl_copy (acc) | mamba |" in report
    for png in ("accuracy_vs_shots.png", "icl_gain.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / png).stat().st_size < 200_000
    assert "ICL gain (points)" in capsys.readouterr().out

    # A second run into the same directory must not overwrite it silently.
    rc = main(["icl", "--model", f"mamba={tiny_mamba_dir}", "--tasks", "icl_copy", "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_gain_and_ratio_definitions():
    # Hand-made scores: two tasks, shots 0/1/3, two seeds; A gains 0.1/0.3, B gains 0.2/0.4.
    scores = []
    for model, zero, gains in (("A", 0.5, {11: 0.1, 12: 0.3}), ("B", 0.3, {11: 0.2, 12: 0.4})):
        for task, offset in (("t1", 0.0), ("t2", 0.1)):
            scores.append({"model": model, "task": task, "shots": 0, "seed": None, "metric": "acc", "value": zero + offset})
            for seed, g in gains.items():
                # 1 shot gains g - 0.05, 3 shots g + 0.05: mean over k is g.
                for k, delta in ((1, -0.05), (3, 0.05)):
                    scores.append({"model": model, "task": task, "shots": k, "seed": seed, "metric": "acc",
                                   "value": zero + offset + g + delta})
    result = SweepResult(models={"A": {"is_mamba": True}, "B": {"is_mamba": False}}, tasks={"t1": "acc", "t2": "acc"},
                         shots=[0, 1, 3], seeds=[11, 12], limit=None, baseline="B", scores=scores)
    _add_gains(result)
    assert result.gains["A"]["mean"] == pytest.approx(0.2)
    assert result.gains["A"]["std"] == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert result.gains["B"]["mean"] == pytest.approx(0.3)
    assert result.ratios["A"]["ratio"] == pytest.approx(0.2 / 0.3)
    assert result.ratios["A"]["min"] == pytest.approx(0.1 / 0.2)
    assert result.ratios["A"]["max"] == pytest.approx(0.3 / 0.4)
    assert "B" not in result.ratios


def test_fine_tuned_against_base_and_in_memory_model(tiny_mamba_dir, tmp_path):
    from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters, save_adapters
    from mamba_ft.models import load_model

    loaded = load_model(str(tiny_mamba_dir))
    attach_adapters(loaded.model, AdapterConfig(targets=["all"], rank=2))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapter_parameters(loaded.model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapter_dir = save_adapters(loaded.model, tmp_path / "adapter", base_model=str(tiny_mamba_dir))

    loaded.model.train()  # as a training loop would hand it over
    specs = [ModelSpec("base", str(tiny_mamba_dir)),
             ModelSpec("tuned", str(tiny_mamba_dir), adapter=str(adapter_dir)),
             ModelSpec("in_memory", model=loaded.model, tokenizer=loaded.tokenizer),
             # The adapter directory alone names the fine-tuned model (`--model tuned2=ADAPTER_DIR`).
             ModelSpec("tuned2", str(adapter_dir))]
    result = run_icl_sweep(specs, tasks=["icl_sort_letters"], shots=(0, 1), seeds=(5,), limit=8,
                           baseline="base", log=lambda line: None)
    assert loaded.model.training  # handed back in the mode it came in
    # The results record the adapter each model was evaluated with, however it was named.
    for label in ("tuned", "tuned2"):
        assert result.models[label]["adapter"] == str(adapter_dir), label
        assert result.models[label]["source"] == str(tiny_mamba_dir), label
    assert result.models["base"]["adapter"] is None

    def rows(label):
        return [(r["task"], r["shots"], r["metric"], r["value"]) for r in result.scores if r["model"] == label]

    # The saved adapter is loaded and used: the fine-tuned model scores as the in-memory model
    # it was saved from, and not as its base. (That its numbers are the merged weights' is
    # checked at the log-likelihood level in test_icl_lm_eval_model.py.)
    assert rows("tuned") == rows("in_memory") == rows("tuned2")
    assert rows("tuned") != rows("base")
    assert result.baseline == "base" and set(result.ratios) == {"tuned", "in_memory", "tuned2"}
    base_gain = result.gains["base"]["mean"]
    for label in result.ratios:
        expected = result.gains[label]["mean"] / base_gain if base_gain else None
        assert result.ratios[label]["ratio"] == pytest.approx(expected)


def test_sweep_passes_bootstrap_iters_to_lm_eval_and_records_standard_errors(tiny_mamba_dir, monkeypatch):
    import lm_eval.evaluator

    seen = []
    real_evaluate = lm_eval.evaluator.evaluate

    def spy(*args, **kwargs):  # the sweep imports `evaluate` when it runs, so it gets this one
        seen.append(kwargs["bootstrap_iters"])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    n = 8
    result = run_icl_sweep([ModelSpec("m", str(tiny_mamba_dir))], tasks=["icl_reverse"], shots=(0, 1),
                           seeds=(5, 6), limit=n, log=lambda line: None)
    assert seen == [1000] * 3 and result.bootstrap_iters == 1000  # the default; 0 shots runs once
    for row in result.scores:
        # acc over n documents is a mean of 0/1 values; its standard error with the n − 1
        # sample variance is sqrt(p(1 − p)/(n − 1)).
        p = row["value"]
        assert row["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1))), row
    gain = result.gains["m"]
    assert gain["se_scores"] is not None and gain["se_seeds"] is not None and gain["ci"] is not None

    seen.clear()
    result = run_icl_sweep([ModelSpec("m", str(tiny_mamba_dir))], tasks=["icl_reverse"], shots=(0, 1),
                           seeds=(5,), limit=4, bootstrap_iters=0, log=lambda line: None)
    assert seen == [0, 0]
    assert all(row["stderr"] is None for row in result.scores)
    assert result.gains["m"]["ci"] is None  # no standard errors and one seed: nothing to go on


def test_training_run_hook_compares_fine_tuned_with_base(tiny_mamba_dir, tmp_path):
    from mamba_ft.evaluation import IclSweepConfig, run_after_training
    from mamba_ft.models import load_model

    loaded = load_model(str(tiny_mamba_dir))  # stands in for the model a run just trained
    with torch.no_grad():
        loaded.model.backbone.embeddings.weight.mul_(0.5)  # make it differ from its base
    lines = []
    config = IclSweepConfig(tasks=["icl_last_letter"], shots=[0, 1], seeds=[3], limit=5, bootstrap_iters=7)
    result = run_after_training(config, loaded.model, loaded.tokenizer, str(tiny_mamba_dir),
                                tmp_path / "icl", log=lines.append)
    assert set(result.models) == {"fine-tuned", "base"} and result.baseline == "base"
    assert result.bootstrap_iters == 7 and all(row["stderr"] is not None for row in result.scores)
    assert (tmp_path / "icl" / "results.json").exists()
    expected = result.gains["fine-tuned"]["mean"] / result.gains["base"]["mean"]
    assert result.ratios["fine-tuned"]["ratio"] == pytest.approx(expected)
    assert lines[-1].startswith("ICL gain of the fine-tuned model:") and "of base's" in lines[-1]


@pytest.mark.parametrize("args, expected", [
    (["--model", "m=/no/such/model", "--tasks", "icl_copy"], "does not exist"),
    (["--model", "m=MODEL", "--model", "x=no-such/model", "--tasks", "icl_copy"], "neither a local path"),
    (["--model", "m=MODEL", "--tasks", "icl_reverze"], "icl_reverse"),
    (["--model", "m=MODEL", "--tasks", "hellaswag"], "--data hellaswag=DIR"),
    (["--model", "m=MODEL", "--adapter", "x=/tmp", "--tasks", "icl_copy"], "LABEL=PATH with LABEL one of"),
    (["--model", "m=MODEL", "--shots", "1,3"], "must include 0"),
    (["--model", "m=MODEL", "--baseline", "nope"], "baseline 'nope'"),
    (["--model", "m=MODEL", "--bootstrap-iters", "-1"], "bootstrap_iters -1 must be a whole number"),
])
def test_cli_bad_input_exits_2_without_traceback(tiny_mamba_dir, args, expected, capsys, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))  # nothing cached
    args = [a.replace("MODEL", str(tiny_mamba_dir)) for a in args]
    assert main(["icl", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and err.count("\n") == 1  # one line


@pytest.mark.slow
def test_lm_eval_command_line_with_the_mamba_ft_model(tiny_mamba_dir, tmp_path):
    cmd = [sys.executable, "-m", "mamba_ft.evaluation", "--model", "mamba-ft",
           "--model_args", f"pretrained={tiny_mamba_dir}", "--tasks", "icl_first_letter",
           "--num_fewshot", "2", "--limit", "4", "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "out")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")  # see conftest
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "icl_first_letter" in proc.stdout and "acc" in proc.stdout
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert saved and json.loads(saved[0].read_text())["n-shot"]["icl_first_letter"] == 2



def test_sweep_takes_a_hybrid_model(tmp_path):
    """A hybrid (Nemotron-H, random init with the bundled tokenizer) through the ICL sweep: it
    loads (with mamba-ft's mixers), is recorded as a Mamba, and every shot count is scored."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mamba_ft.models.loading import BUNDLED_DIR

    config = AutoConfig.for_model(
        "nemotron_h", vocab_size=272, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, layers_block_type=["mamba", "attention", "mamba"], num_hidden_layers=3,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=4, conv_kernel=4, expand=2,
        chunk_size=8)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hybrid")
    AutoTokenizer.from_pretrained(BUNDLED_DIR / "tokenizer").save_pretrained(tmp_path / "hybrid")
    result = run_icl_sweep([ModelSpec("hybrid", str(tmp_path / "hybrid"))], tasks=["icl_reverse"],
                           shots=(0, 1), seeds=(5,), limit=4, bootstrap_iters=0, log=lambda line: None)
    assert result.models["hybrid"]["is_mamba"]
    assert {row["shots"] for row in result.scores} == {0, 1}
    assert all(0.0 <= row["value"] <= 1.0 for row in result.scores)
