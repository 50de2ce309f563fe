"""`mamba-ft paper` end to end on the bundled tiny models (a shortened setting, two training
seeds), its refusals, the generated instruction data, the statistics over training seeds
against an independent computation, and the fine-tuning drift against a direct KL computation."""

from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import stats

from mamba_ft.adapters import load_adapters
from mamba_ft.cli import main
from mamba_ft.evaluation.stability import model_drift
from mamba_ft.evaluation.stability_report import default_text, token_rows
from mamba_ft.models import load_model
from mamba_ft.paper import over_training_seeds
from mamba_ft.rules import INSTRUCTION, RULES, instruction_rows

pytest.importorskip("lm_eval")

SHORT = ["--steps", "3", "--limit", "3", "--shots", "0,1", "--seeds", "1234", "--lr", "1e-2"]
SEEDS = (0, 1)
MODELS = ("mamba", "transformer")
Z975 = stats.norm.ppf(0.975)


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
    assert main(["paper", *SHORT, "--training-seeds", ",".join(map(str, SEEDS)), "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"training-seed-{seed}"


def test_tuned_models_evaluated_are_the_trained_adapters(paper_run):
    out, results = paper_run
    assert results["training_seeds"] == list(SEEDS)
    before = json.loads((out / "icl-before" / "results.json").read_text())
    md = (out / "results.md").read_text()
    for seed in SEEDS:
        after = json.loads((seed_dir(out, seed) / "icl-after" / "results.json").read_text())
        assert results["icl"]["after"][str(seed)]["dir"] == str(seed_dir(out, seed) / "icl-after")
        for model in MODELS:
            adapter = results["runs"][str(seed)][model]["peft-bf16"]["adapter"]
            assert adapter == str(seed_dir(out, seed) / "runs" / f"{model}-peft-bf16" / "adapter")
            assert any(Path(adapter).iterdir())
            # The run trained with this seed, and what the sweep loaded, as its own results.json
            # records it, is that directory.
            recipe = (seed_dir(out, seed) / "runs" / f"{model}-peft-bf16" / "recipe.yaml").read_text()
            assert f"seed: {seed}\n" in recipe
            assert after["models"][f"{model}-tuned"]["adapter"] == adapter
            assert results["icl"]["after"][str(seed)]["models"][model]["adapter"] == adapter
            assert before["models"][f"{model}-base"]["adapter"] is None
            scores = {}
            for sweep, label in ((before, f"{model}-base"), (after, f"{model}-tuned")):
                scores[label] = {(r["task"], r["shots"], r["metric"]): r["value"]
                                 for r in sweep["scores"] if r["model"] == label}
            assert scores[f"{model}-base"].keys() == scores[f"{model}-tuned"].keys()
            assert scores[f"{model}-base"] != scores[f"{model}-tuned"], model
            assert f"- training seed {seed}, {model}: `{adapter}`" in md


def test_two_training_seeds_give_different_adapters(paper_run):
    out, results = paper_run
    for model in MODELS:
        weights = [load_file(Path(results["runs"][str(seed)][model]["peft-bf16"]["adapter"])
                             / "adapter_model.safetensors") for seed in SEEDS]
        assert weights[0].keys() == weights[1].keys() and weights[0]
        assert any(not torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), model
    # The cost and drift baselines are trained for the first training seed only.
    assert sorted(p.name for p in (seed_dir(out, 0) / "runs").iterdir()) == sorted(
        f"{model}-{run}" for model in MODELS for run in ("peft-bf16", "full-fp32", "peft-fp32"))
    assert sorted(p.name for p in (seed_dir(out, 1) / "runs").iterdir()) == [
        "mamba-peft-bf16", "transformer-peft-bf16"]
    assert results["costs_and_drift_training_seed"] == 0


def sweeps_of(out: Path):
    """(stage name, suffix, the sweep's own results.json, its entry in the paper's results)."""
    yield "pretrained", "base", json.loads((out / "icl-before" / "results.json").read_text()), "before", None
    for seed in SEEDS:
        sweep = json.loads((seed_dir(out, seed) / "icl-after" / "results.json").read_text())
        yield f"training seed {seed} |", "tuned", sweep, "after", str(seed)


def test_gains_and_ratios_recompute_from_the_scores(paper_run):
    out, results = paper_run
    md = (out / "results.md").read_text().splitlines()
    for row_name, suffix, sweep, stage, seed in sweeps_of(out):
        entry = results["icl"][stage] if seed is None else results["icl"][stage][seed]
        gains = {}
        for model in MODELS:
            rows = {(r["task"], r["shots"]): r["value"] for r in sweep["scores"]
                    if r["model"] == f"{model}-{suffix}" and r["metric"] == "acc"}
            tasks = {task for task, _ in rows}
            assert len(tasks) == 6  # the bundled rule tasks
            gains[model] = statistics.fmean(rows[(t, 1)] - rows[(t, 0)] for t in tasks)
            assert entry["models"][model]["gain"]["mean"] == pytest.approx(gains[model])
        ratio = entry["ratio"]
        assert ratio["ratio"] == pytest.approx(gains["mamba"] / gains["transformer"])
        if ratio["ci"] is not None:
            assert ratio["ci"][0] <= ratio["ratio"] <= ratio["ci"][1]
        row = next(line for line in md if row_name in line)
        assert f"{100 * ratio['ratio']:.1f}%" in row


def fieller_roots(num, den, var_num, cov, var_den):
    """Fieller's set {R : (num − R·den)² <= var_num − 2R·cov + R²·var_den} by NumPy's polynomial
    roots: (low, high), or None when it is not a finite interval."""
    poly = np.poly1d([-den, num]) ** 2 - np.poly1d([var_den, -2 * cov, var_num])
    if poly.coeffs[0] <= 0:
        return None
    low, high = sorted(np.roots(poly.coeffs).real)
    return low, high


def expected_over_seeds(per_seed: dict[str, list[tuple[float, float]]]):
    """The combined gains and ratio, computed here from the per-seed (gain, se) pairs with SciPy's
    t quantile and NumPy's covariance (the docs' recipe, docs/icl.md)."""
    n = len(per_seed["mamba"])
    t = stats.t.ppf(0.975, n - 1)
    gains = {model: np.array([g for g, _ in values]) for model, values in per_seed.items()}
    within = {model: np.mean([se for _, se in values]) for model, values in per_seed.items()}
    expected = {}
    for model in MODELS:
        mean = gains[model].mean()
        seed_half = t * gains[model].std(ddof=1) / np.sqrt(n)
        half = np.hypot(seed_half, Z975 * within[model])
        expected[model] = dict(mean=mean, ci_seeds=[mean - seed_half, mean + seed_half],
                               ci=[mean - half, mean + half])
    cov = np.cov(gains["mamba"], gains["transformer"], ddof=1) * t ** 2 / n
    num, den = gains["mamba"].mean(), gains["transformer"].mean()
    expected["ratio"] = num / den
    expected["ratio_ci_seeds"] = fieller_roots(num, den, cov[0, 0], cov[0, 1], cov[1, 1])
    expected["ratio_ci"] = fieller_roots(num, den, cov[0, 0] + (Z975 * within["mamba"]) ** 2, cov[0, 1],
                                         cov[1, 1] + (Z975 * within["transformer"]) ** 2)
    return expected


def test_mean_over_training_seeds_recomputes_from_the_per_seed_sweeps(paper_run):
    out, results = paper_run
    over = results["icl"]["over_training_seeds"]
    # The per-seed gains and standard errors, as each seed's own sweep wrote them.
    per_seed = {model: [] for model in MODELS}
    for seed in SEEDS:
        sweep = json.loads((seed_dir(out, seed) / "icl-after" / "results.json").read_text())
        for model in MODELS:
            gain = sweep["gains"][f"{model}-tuned"]
            per_seed[model].append((gain["mean"], gain["se"]))
        assert over["ratio"]["per_seed"][SEEDS.index(seed)] == sweep["ratios"]["mamba-tuned"]["ratio"]
    assert all(se is not None and se > 0 for values in per_seed.values() for _, se in values)
    expected = expected_over_seeds(per_seed)
    for model in MODELS:
        got = over["models"][model]
        assert got["per_seed"] == [g for g, _ in per_seed[model]]
        assert got["mean"] == pytest.approx(expected[model]["mean"], rel=1e-12, abs=1e-15)
        assert got["ci_seeds"] == pytest.approx(expected[model]["ci_seeds"], rel=1e-6, abs=1e-9)
        assert got["ci"] == pytest.approx(expected[model]["ci"], rel=1e-6, abs=1e-9)
    ratio = over["ratio"]
    assert ratio["ratio"] == pytest.approx(expected["ratio"], rel=1e-12)
    for key in ("ci_seeds", "ci"):
        if expected[f"ratio_{key}"] is None:
            assert ratio[key] is None and ratio[f"{key}_unbounded"]
        else:
            assert ratio[key] == pytest.approx(list(expected[f"ratio_{key}"]), rel=1e-6)
            assert not ratio[f"{key}_unbounded"]
    row = next(line for line in (out / "results.md").read_text().splitlines()
               if "mean over 2 training seeds" in line)
    assert f"{100 * ratio['ratio']:.1f}%" in row
    assert f"{100 * over['models']['mamba']['mean']:+.1f}" in row


def sweep_entry(gains: dict[str, tuple[float, float]], ratio: float | None = None) -> dict:
    return {"models": {model: {"gain": {"mean": mean, "se": se}} for model, (mean, se) in gains.items()},
            "ratio": {"ratio": ratio}}


def test_over_training_seeds_against_scipy_on_made_up_sweeps():
    per_seed = {"mamba": [(0.70, 0.018), (0.45, 0.02), (0.52, 0.015)],
                "transformer": [(0.37, 0.02), (0.50, 0.019), (0.41, 0.021)]}
    sweeps = [sweep_entry({m: per_seed[m][i] for m in MODELS}) for i in range(3)]
    over = over_training_seeds(sweeps, [0, 1, 2])
    expected = expected_over_seeds(per_seed)
    assert over["t_quantile"] == pytest.approx(stats.t.ppf(0.975, 2), rel=1e-6)
    for model in MODELS:
        assert over["models"][model]["ci"] == pytest.approx(expected[model]["ci"], rel=1e-6)
        assert over["models"][model]["ci_seeds"] == pytest.approx(expected[model]["ci_seeds"], rel=1e-6)
    assert over["ratio"]["ci"] == pytest.approx(list(expected["ratio_ci"]), rel=1e-6)
    assert over["ratio"]["ci_seeds"] == pytest.approx(list(expected["ratio_ci_seeds"]), rel=1e-6)
    # A Transformer whose combined gain interval holds 0: the ratio stays unbounded.
    per_seed["transformer"] = [(0.05, 0.02), (-0.02, 0.02), (0.01, 0.02)]
    sweeps = [sweep_entry({m: per_seed[m][i] for m in MODELS}) for i in range(3)]
    over = over_training_seeds(sweeps, [0, 1, 2])
    low, high = over["models"]["transformer"]["ci"]
    assert low < 0 < high
    assert over["ratio"]["ci"] is None and over["ratio"]["ci_unbounded"]
    assert expected_over_seeds(per_seed)["ratio_ci"] is None


def test_one_training_seed_is_that_seeds_sweep():
    """With one training seed there is no seed spread: the intervals are the sweep's own (the
    normal interval of each gain, Fieller's of the ratio), as before --training-seeds."""
    from mamba_ft.evaluation.intervals import fieller_interval, normal_interval

    over = over_training_seeds([sweep_entry({"mamba": (0.4, 0.03), "transformer": (0.5, 0.025)}, 0.8)], [7])
    assert over["t_quantile"] is None
    for model, (mean, se) in (("mamba", (0.4, 0.03)), ("transformer", (0.5, 0.025))):
        assert over["models"][model]["ci_seeds"] is None
        assert over["models"][model]["ci"] == pytest.approx(list(normal_interval(mean, se)), rel=1e-12)
    assert over["ratio"]["ci_seeds"] is None and not over["ratio"]["ci_seeds_unbounded"]
    assert over["ratio"]["ci"] == pytest.approx(list(fieller_interval(0.4, 0.03, 0.5, 0.025)), rel=1e-12)


def test_cost_rows_come_from_the_runs_metrics(paper_run):
    out, results = paper_run
    for model in ("mamba", "transformer"):
        read = {}
        for run in ("peft-bf16", "full-fp32"):
            lines = (seed_dir(out, 0) / "runs" / f"{model}-{run}" / "metrics.jsonl").read_text().splitlines()
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
        assert (seed_dir(out, 0) / "runs" / f"{model}-full-fp32" / "model" / "config.json").is_file()


def test_drift_is_the_kl_between_the_two_tuned_adapters(paper_run):
    out, results = paper_run
    drift = results["drift"]["mamba"]
    models = []
    for run in ("peft-fp32", "peft-bf16"):
        loaded = load_model("bundled:tiny-mamba")
        load_adapters(loaded.model, seed_dir(out, 0) / "runs" / f"mamba-{run}" / "adapter")
        models.append(loaded.model)
    ids = token_rows(loaded.tokenizer, default_text(), 4, 128)
    kl, rel = direct_kl_and_rel(*models, ids)
    assert drift["kl"] == pytest.approx(kl.tolist(), rel=1e-6, abs=1e-12)
    assert drift["logit_rel_error"] == pytest.approx(rel.tolist(), rel=1e-6)
    assert drift["mean_kl"] > 0  # bf16 autocast changed the trained adapter
    for model in ("mamba", "transformer"):
        for run in ("peft-fp32", "peft-bf16"):
            lines = (seed_dir(out, 0) / "runs" / f"{model}-{run}" / "metrics.jsonl").read_text().splitlines()
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
    (["--training-seeds", "0,1,0"], "--training-seeds 0,1,0 repeats 0;"),
    (["--training-seeds", "0,x"], "--training-seeds '0,x' must be comma-separated whole numbers"),
    (["--training-seeds", "1.5"], "--training-seeds '1.5' must be comma-separated whole numbers"),
    (["--training-seeds", ""], "--training-seeds lists no seed"),
    (["--training-seeds", " , "], "--training-seeds lists no seed"),
    (["--training-seeds", "-1"], "seeds are whole numbers from 0 to 4294967295"),
    (["--training-seeds", "4294967296"], "seeds are whole numbers from 0 to 4294967295"),
    (["--seed", "1"], "--seed was replaced by --training-seeds"),
    (["--data-seed", "x"], "--data-seed 'x' must be a whole number"),
    (["--data-seed", "-3"], "--data-seed -3 must be a whole number >= 0"),
    (["--data-seed", "1", "--data", "rows.jsonl"], "--data-seed goes with the generated data"),
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
