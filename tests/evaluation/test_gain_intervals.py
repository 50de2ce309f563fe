"""Intervals on ICL gains and gain ratios, against computations that do not share the code's
formulas: a Monte-Carlo of the gain's definition, a grid inversion of the normal test for the
ratio, and the coverage of the ratio's interval on simulated data. No lm-eval needed."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from mamba_ft.errors import UserError
from mamba_ft.evaluation.intervals import fieller_interval
from mamba_ft.evaluation.report import summary_table
from mamba_ft.evaluation.result import SweepResult
from mamba_ft.evaluation.sweep import _add_gains
from mamba_ft.recipe import IclSweepConfig, validate_mapping

Z95 = 1.959963984540054  # the 97.5% quantile of N(0, 1), written out


def make_result(models: dict[str, dict], seeds=(11, 12, 13), with_stderr=True) -> SweepResult:
    """Scores for two tasks at shots 0/1/3; models[label] = {(task, shots, seed): (value, se)}."""
    scores = [{"model": label, "task": task, "shots": k, "seed": seed, "metric": "acc", "value": value,
               "stderr": se if with_stderr else None}
              for label, cells in models.items() for (task, k, seed), (value, se) in cells.items()]
    return SweepResult(models={label: {"is_mamba": i == 0} for i, label in enumerate(models)},
                       tasks={"t1": "acc", "t2": "acc"}, shots=[0, 1, 3], seeds=list(seeds), limit=None,
                       baseline=list(models)[-1], scores=scores, bootstrap_iters=1000 if with_stderr else 0)


def cells(rng: np.random.Generator, zero: float, gain: float, seeds=(11, 12, 13)) -> dict:
    """Scores around `zero` at 0 shots and `zero + gain` after, each with a binomial-like se."""
    out = {}
    for task in ("t1", "t2"):
        p0 = zero + rng.uniform(-0.05, 0.05)
        out[(task, 0, None)] = (p0, math.sqrt(p0 * (1 - p0) / 50))
        for k in (1, 3):
            for seed in seeds:
                p = min(0.99, p0 + gain + rng.uniform(-0.05, 0.05))
                out[(task, k, seed)] = (p, math.sqrt(p * (1 - p) / 50))
    return out


def definition_gain(draws: dict, seeds) -> np.ndarray:
    """The seed-mean gain from its definition, for arrays of draws of every score."""
    per_seed = []
    for seed in seeds:
        diffs = [draws[(t, k, seed)] - draws[(t, 0, None)] for t in ("t1", "t2") for k in (1, 3)]
        per_seed.append(sum(diffs) / len(diffs))
    return sum(per_seed) / len(per_seed)


def test_gain_standard_error_matches_a_monte_carlo_of_its_definition():
    rng = np.random.default_rng(0)
    data = {"mamba": cells(rng, 0.2, 0.5), "gpt": cells(rng, 0.25, 0.6)}
    result = make_result(data)
    _add_gains(result)
    draws_n = 200_000
    for label, model_cells in data.items():
        gain = result.gains[label]
        # Document noise: draw every score independently from N(value, se²) and recompute the gain.
        draws = {key: rng.normal(value, se, draws_n) for key, (value, se) in model_cells.items()}
        mc_se = definition_gain(draws, result.seeds).std(ddof=1)
        # The relative error of a sample std from 200k draws is about 1/sqrt(2·200k) = 0.16%.
        assert gain["se_scores"] == pytest.approx(mc_se, rel=0.01)
        # Seed spread: the standard error of the mean of the three per-seed gains.
        per_seed = [definition_gain({k: v for k, (v, _) in model_cells.items()}, [s]) for s in result.seeds]
        assert gain["mean"] == pytest.approx(statistics.fmean(per_seed))
        assert gain["se_seeds"] == pytest.approx(np.std(per_seed, ddof=1) / math.sqrt(3))
        assert gain["se"] == pytest.approx(math.hypot(mc_se, gain["se_seeds"]), rel=0.01)
        low, high = gain["ci"]
        assert (low + high) / 2 == pytest.approx(gain["mean"])
        assert (high - low) / 2 == pytest.approx(Z95 * gain["se"])


def test_missing_sources_leave_what_is_known():
    rng = np.random.default_rng(1)
    data = {"mamba": cells(rng, 0.2, 0.5, seeds=(11,)), "gpt": cells(rng, 0.25, 0.6, seeds=(11,))}
    # One seed, no standard errors: nothing to build an interval from.
    result = make_result(data, seeds=(11,), with_stderr=False)
    _add_gains(result)
    assert result.gains["mamba"]["se"] is None and result.gains["mamba"]["ci"] is None
    assert result.ratios["mamba"]["ci"] is None and not result.ratios["mamba"]["ci_unbounded"]
    assert "| – | " in summary_table(result)
    # One seed with standard errors: the interval is the documents' alone.
    result = make_result(data, seeds=(11,))
    _add_gains(result)
    assert result.gains["mamba"]["se_seeds"] is None
    assert result.gains["mamba"]["se"] == result.gains["mamba"]["se_scores"] > 0


def accepted(num, se_num, den, se_den, ratios: np.ndarray) -> np.ndarray:
    """The ratios R the normal test of num − R·den = 0 does not reject at 5%."""
    return np.abs(num - ratios * den) <= Z95 * np.sqrt(se_num**2 + ratios**2 * se_den**2)


@pytest.mark.parametrize("num, se_num, den, se_den", [
    (0.30, 0.05, 0.40, 0.06),   # both well determined
    (0.05, 0.04, 0.40, 0.10),   # numerator interval spans 0: the ratio's may too
    (-0.20, 0.03, 0.15, 0.07),  # negative ratio, denominator only just away from 0
])
def test_ratio_interval_is_the_inverted_normal_test(num, se_num, den, se_den):
    low, high = fieller_interval(num, se_num, den, se_den)
    grid = np.linspace(-20, 20, 4_000_001)  # spacing 1e-5
    inside = grid[accepted(num, se_num, den, se_den, grid)]
    assert inside.min() == pytest.approx(low, abs=2e-5)
    assert inside.max() == pytest.approx(high, abs=2e-5)
    # And the accepted set is one interval: no accepted point outside it.
    assert len(inside) == pytest.approx((high - low) / 1e-5, abs=2)


def test_ratio_whose_baseline_gain_interval_spans_zero_is_unbounded():
    num, se_num, den, se_den = 0.30, 0.05, 0.05, 0.04  # baseline gain 0.05 ± 1.96·0.04 holds 0
    assert den - Z95 * se_den < 0 < den + Z95 * se_den
    assert fieller_interval(num, se_num, den, se_den) is None
    # Independently: the test accepts arbitrarily large ratios, so no finite interval is right.
    assert accepted(num, se_num, den, se_den, np.array([1e3, 1e6, 1e9])).all()

    # Through the sweep's gains and the report: "unbounded", never a number.
    rng = np.random.default_rng(2)
    base = cells(rng, 0.3, 0.0)  # a baseline that gains nothing from examples
    result = make_result({"mamba": cells(rng, 0.2, 0.5), "gpt": base})
    _add_gains(result)
    g = result.gains["gpt"]
    assert g["ci"][0] < 0 < g["ci"][1]
    assert result.ratios["mamba"]["ci"] is None and result.ratios["mamba"]["ci_unbounded"]
    row = next(line for line in summary_table(result).splitlines() if line.startswith("| mamba |"))
    assert row.endswith("| unbounded |")


def test_ratio_interval_covers_the_true_ratio_95_percent_of_the_time():
    # Under the normal model the interval is exact: simulate estimates around known gains.
    rng = np.random.default_rng(3)
    true_num, true_den, se_num, se_den = 0.3, 0.4, 0.05, 0.06
    trials = 20_000
    covered = 0
    for num, den in zip(rng.normal(true_num, se_num, trials), rng.normal(true_den, se_den, trials)):
        interval = fieller_interval(num, se_num, den, se_den)
        # den/se_den is about 6.7, so an unbounded interval (None) essentially never occurs; it
        # would contain the true ratio only if the test accepts it, checked directly then.
        if interval is None:
            covered += bool(accepted(num, se_num, den, se_den, np.array([true_num / true_den]))[0])
        else:
            covered += interval[0] <= true_num / true_den <= interval[1]
    # Binomial standard error of the coverage: sqrt(0.95·0.05/20000) = 0.0015; allow 4 of them.
    assert covered / trials == pytest.approx(0.95, abs=0.006)


@pytest.mark.parametrize("value, expected", [
    (-1, "greater than or equal to 0"),
    ("many", "valid integer"),
    (2.5, "valid integer"),
    (True, "valid integer"),
])
def test_bad_bootstrap_iters_is_one_clear_error(value, expected):
    with pytest.raises(UserError) as err:
        validate_mapping(IclSweepConfig, {"bootstrap_iters": value}, where="recipe.yaml")
    message = str(err.value)
    assert "'bootstrap_iters'" in message and expected in message and "\n" not in message


def test_unknown_icl_sweep_key_names_the_close_one():
    with pytest.raises(UserError, match="Did you mean 'bootstrap_iters'"):
        validate_mapping(IclSweepConfig, {"bootstrap_iter": 10}, where="recipe.yaml")


def test_bootstrap_iters_in_a_whole_recipe_names_its_dotted_key():
    from mamba_ft.recipe import validate_recipe

    recipe = {"model": {"source": "bundled:tiny-mamba"},
              "data": {"train": {"path": "bundled:data/rotate-train.jsonl"}, "format": "completion"},
              "run": {"output_dir": "out", "max_steps": 3},
              "evaluation": {"icl_sweep": {"bootstrap_iters": 0}}}
    assert validate_recipe(recipe).evaluation.icl_sweep.bootstrap_iters == 0
    recipe["evaluation"]["icl_sweep"]["bootstrap_iters"] = -10
    with pytest.raises(UserError, match="'evaluation.icl_sweep.bootstrap_iters' in recipe: "
                                        "Input should be greater than or equal to 0"):
        validate_recipe(recipe)


def test_bootstrap_iters_default_and_zero_are_accepted():
    assert IclSweepConfig().bootstrap_iters == 1000
    assert IclSweepConfig(bootstrap_iters=0).bootstrap_iters == 0


def test_sweep_refuses_negative_bootstrap_iters_before_loading_anything():
    from mamba_ft.evaluation import ModelSpec, run_icl_sweep

    pytest.importorskip("lm_eval")
    with pytest.raises(UserError, match="bootstrap_iters -5 must be a whole number >= 0"):
        run_icl_sweep([ModelSpec("m", "/no/such/model")], bootstrap_iters=-5)
