"""`mamba-ft paper` end to end on the bundled tiny models (a shortened setting), its refusals,
the generated instruction data, and the fine-tuning drift against a direct KL computation."""

from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mamba_ft.adapters import load_adapters
from mamba_ft.cli import main
from mamba_ft.evaluation.stability import model_drift
from mamba_ft.evaluation.stability_report import default_text, token_rows
from mamba_ft.models import load_model
from mamba_ft.rules import INSTRUCTION, RULES, instruction_rows

pytest.importorskip("lm_eval")

SHORT = ["--steps", "3", "--limit", "3", "--shots", "0,1", "--seeds", "1234", "--lr", "1e-2"]


def direct_kl_and_rel(reference, other, ids):
    """KL(p_ref || p_other) and the relative logit error per position, averaged over rows,
    from two plain forwards, in float64 through torch's own kl_div."""
    with torch.no_grad():
        a = reference.eval()(input_ids=ids).logits.double()
        b = other.eval()(input_ids=ids).logits.double()
    kl = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
    rel = torch.linalg.vector_norm(b - a, dim=-1) / torch.linalg.vector_norm(a, dim=-1)
    return kl.mean(0), rel.mean(0)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "out"
    assert main(["paper", *SHORT, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_tuned_models_evaluated_are_the_trained_adapters(paper_run):
    out, results = paper_run
    before = json.loads((out / "icl-before" / "results.json").read_text())
    after = json.loads((out / "icl-after" / "results.json").read_text())
    for model in ("mamba", "transformer"):
        adapter = results["runs"][model]["peft-bf16"]["adapter"]
        assert adapter == str(out / "runs" / f"{model}-peft-bf16" / "adapter")
        assert any(Path(adapter).iterdir())
        # What the sweep loaded, as its own results.json records it, is that directory.
        assert after["models"][f"{model}-tuned"]["adapter"] == adapter
        assert results["icl"]["after"]["models"][model]["adapter"] == adapter
        assert before["models"][f"{model}-base"]["adapter"] is None
        scores = {}
        for sweep, label in ((before, f"{model}-base"), (after, f"{model}-tuned")):
            scores[label] = {(r["task"], r["shots"], r["metric"]): r["value"]
                             for r in sweep["scores"] if r["model"] == label}
        assert scores[f"{model}-base"].keys() == scores[f"{model}-tuned"].keys()
        assert scores[f"{model}-base"] != scores[f"{model}-tuned"], model
    assert f"`{results['runs']['mamba']['peft-bf16']['adapter']}`" in (out / "results.md").read_text()


def test_gains_and_ratios_recompute_from_the_scores(paper_run):
    out, results = paper_run
    for stage, suffix in (("before", "base"), ("after", "tuned")):
        sweep = json.loads((out / f"icl-{stage}" / "results.json").read_text())
        gains = {}
        for model in ("mamba", "transformer"):
            rows = {(r["task"], r["shots"]): r["value"] for r in sweep["scores"]
                    if r["model"] == f"{model}-{suffix}" and r["metric"] == "acc"}
            tasks = {task for task, _ in rows}
            assert len(tasks) == 6  # the bundled rule tasks
            gains[model] = statistics.fmean(rows[(t, 1)] - rows[(t, 0)] for t in tasks)
            assert results["icl"][stage]["models"][model]["gain"]["mean"] == pytest.approx(gains[model])
        ratio = results["icl"][stage]["ratio"]
        assert ratio["ratio"] == pytest.approx(gains["mamba"] / gains["transformer"])
        if ratio["ci"] is not None:
            assert ratio["ci"][0] <= ratio["ratio"] <= ratio["ci"][1]
        row = next(line for line in (out / "results.md").read_text().splitlines()
                   if line.startswith("| pretrained" if stage == "before" else "| fine-tuned"))
        assert f"{100 * ratio['ratio']:.1f}%" in row


def test_cost_rows_come_from_the_runs_metrics(paper_run):
    out, results = paper_run
    for model in ("mamba", "transformer"):
        read = {}
        for run in ("peft-bf16", "full-fp32"):
            lines = (out / "runs" / f"{model}-{run}" / "metrics.jsonl").read_text().splitlines()
            steps = [json.loads(line) for line in lines if '"tokens_per_s"' in line]
            assert [row["step"] for row in steps] == [1, 2, 3]
            read[run] = (statistics.median(row["tokens_per_s"] for row in steps[1:]),
                         max(row["peak_memory_mb"] for row in steps))
        cost = results["costs"][model]
        assert (cost["peft"]["tokens_per_s"], cost["peft"]["peak_memory_mb"]) == read["peft-bf16"]
        assert (cost["full"]["tokens_per_s"], cost["full"]["peak_memory_mb"]) == read["full-fp32"]
        assert cost["speedup"] == pytest.approx(read["peft-bf16"][0] / read["full-fp32"][0])
        assert cost["memory_per_token_saving"] == pytest.approx(1 - read["peft-bf16"][1] / read["full-fp32"][1])
        # The full fine-tune trained every weight: it saved a whole model, not an adapter.
        assert (out / "runs" / f"{model}-full-fp32" / "model" / "config.json").is_file()


def test_drift_is_the_kl_between_the_two_tuned_adapters(paper_run):
    out, results = paper_run
    drift = results["drift"]["mamba"]
    models = []
    for run in ("peft-fp32", "peft-bf16"):
        loaded = load_model("bundled:tiny-mamba")
        load_adapters(loaded.model, out / "runs" / f"mamba-{run}" / "adapter")
        models.append(loaded.model)
    ids = token_rows(loaded.tokenizer, default_text(), 4, 128)
    kl, rel = direct_kl_and_rel(*models, ids)
    assert drift["kl"] == pytest.approx(kl.tolist(), rel=1e-6, abs=1e-12)
    assert drift["logit_rel_error"] == pytest.approx(rel.tolist(), rel=1e-6)
    assert drift["mean_kl"] > 0  # bf16 autocast changed the trained adapter
    for model in ("mamba", "transformer"):
        for run in ("peft-fp32", "peft-bf16"):
            lines = (out / "runs" / f"{model}-{run}" / "metrics.jsonl").read_text().splitlines()
            last = [json.loads(line)["eval_loss"] for line in lines if '"eval_loss"' in line][-1]
            assert results["drift"][model]["eval_loss"][run] == last


def test_model_drift_matches_a_direct_kl_of_two_models_logits():
    for source in ("bundled:tiny-mamba", "bundled:tiny-gpt-neox"):
        reference = load_model(source, allow_transformers=True)
        other = load_model(source, allow_transformers=True).model
        with torch.no_grad():  # a different model of the same shape: every weight moved a little
            generator = torch.Generator().manual_seed(0)
            for param in other.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        ids = token_rows(reference.tokenizer, default_text(), 2, 64)
        drift = model_drift(reference.model, other, ids)
        kl, rel = direct_kl_and_rel(reference.model, other, ids)
        assert kl.min() > 0
        assert drift.kl == pytest.approx(kl.tolist(), rel=1e-6, abs=1e-12)
        assert drift.logit_rel_error == pytest.approx(rel.tolist(), rel=1e-6)
        assert drift.summary()["mean_kl"] == pytest.approx(kl.mean().item(), rel=1e-6)


def test_instruction_rows_answer_the_rule_their_demonstrations_show():
    for row in instruction_rows(random.Random(3), 200):
        assert row["instruction"] == INSTRUCTION
        *demos, query = row["input"].split("\n")
        pairs = [re.fullmatch(r"Q: (\w+) A: (\w+)", line).groups() for line in demos]
        word = re.fullmatch(r"Q: (\w+) A:", query).group(1)
        rules = [name for name, rule in RULES.items() if all(rule(q) == a for q, a in pairs)]
        # The query's answers differ between rules, so every rule the demos allow is checked.
        assert 1 <= len(pairs) <= 5 and rules
        assert row["output"] in {f" {RULES[name](word)}\n" for name in rules}


@pytest.mark.parametrize("options, message", [
    (["--precision", "fp8"], "--precision 'fp8' is not one of"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--steps", "ten"], "--steps 'ten' must be a whole number"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--shots", "1,3"], "must include 0"),
    (["--limit", "-2"], "--limit -2.0 must be positive"),
    (["--tasks", "icl_reverze"], "Unknown task 'icl_reverze'"),
    (["--eval-data", "x.jsonl"], "--eval-data goes with --data"),
    (["--mamba", "no/such/dir"], "Model path 'no/such/dir' does not exist"),
    (["--data", "missing.jsonl"], "Data file 'missing.jsonl' does not exist"),
    ([], "not empty"),
])
def test_bad_options_are_one_error_line_and_exit_2(tmp_path, capsys, options, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["paper", *options, "--out", str(out)] + (["--overwrite"] if options else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mamba-ft: error:") and message in err[0], err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # nothing was trained or written


def test_missing_out_is_one_error_line(capsys):
    assert main(["paper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mamba-ft: error: --out is required")
