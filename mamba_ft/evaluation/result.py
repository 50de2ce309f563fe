"""The outcome of an ICL sweep: every score, and the gains and ratios computed from them."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class SweepResult:
    models: dict[str, dict]  # label -> {source, adapter, is_mamba}
    tasks: dict[str, str]  # task -> metric the gain uses
    shots: list[int]
    seeds: list[int]
    limit: int | float | None
    baseline: str | None
    # {model, task, shots, seed (None at 0 shots), metric, value, stderr (lm-eval's; None
    # when it computed none: bootstrap_iters 0, or a single document)}
    scores: list[dict]
    # label -> {mean, std, per_seed, se_scores, se_seeds, se, ci}: se_scores from the scores'
    # standard errors, se_seeds = std / sqrt(seeds), se both combined, ci the 95% interval
    # (each None where its inputs were not recorded; docs/icl.md, "Intervals")
    gains: dict[str, dict] = field(default_factory=dict)
    # label -> {ratio, per_seed, min, max, ci, ci_unbounded}: ci is Fieller's 95% interval, None
    # when unbounded (ci_unbounded true) or when the gains have no standard errors
    ratios: dict[str, dict] = field(default_factory=dict)
    bootstrap_iters: int = 0  # what lm-eval was given (0: no standard errors)
    out_dir: str | None = None

    def _row(self, model: str, task: str, shots: int, seed: int | None, metric: str | None) -> dict:
        metric = metric or self.tasks[task]
        seed = None if shots == 0 else seed
        for row in self.scores:
            if (row["model"], row["task"], row["shots"], row["seed"], row["metric"]) == (model, task, shots, seed, metric):
                return row
        raise KeyError((model, task, shots, seed, metric))

    def score(self, model: str, task: str, shots: int, seed: int | None, metric: str | None = None) -> float:
        return self._row(model, task, shots, seed, metric)["value"]

    def stderr(self, model: str, task: str, shots: int, seed: int | None, metric: str | None = None) -> float | None:
        """lm-eval's standard error of that score over documents; None where none was recorded."""
        return self._row(model, task, shots, seed, metric).get("stderr")

    def accuracy(self, model: str, task: str, shots: int) -> tuple[float, float]:
        """Mean and standard deviation over seeds of the task's metric (std 0 at 0 shots)."""
        values = [self.score(model, task, shots, seed) for seed in self._seeds_at(shots)]
        return statistics.fmean(values), sample_std(values)

    def accuracy_se(self, model: str, task: str, shots: int) -> float | None:
        """The document standard error of `accuracy`'s mean over seeds (scores independent)."""
        errors = [self.stderr(model, task, shots, seed) for seed in self._seeds_at(shots)]
        if any(se is None for se in errors):
            return None
        return math.sqrt(sum(se * se for se in errors)) / len(errors)

    def _seeds_at(self, shots: int) -> list[int]:
        return self.seeds if shots else self.seeds[:1]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SweepResult:
        """The result a results.json holds (JSON turned the per-seed keys into strings)."""
        data = dict(data)
        for section in ("gains", "ratios"):
            data[section] = {label: {**v, "per_seed": {int(k): x for k, x in v["per_seed"].items()}}
                             for label, v in data[section].items()}
        return cls(**data)


def sample_std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
