"""The outcome of an ICL sweep: every score, and the gains and ratios computed from them."""

from __future__ import annotations

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
    scores: list[dict]  # {model, task, shots, seed (None at 0 shots), metric, value}
    gains: dict[str, dict] = field(default_factory=dict)  # label -> {mean, std, per_seed}
    ratios: dict[str, dict] = field(default_factory=dict)  # label -> {ratio, per_seed, min, max}
    out_dir: str | None = None

    def score(self, model: str, task: str, shots: int, seed: int | None, metric: str | None = None) -> float:
        metric = metric or self.tasks[task]
        seed = None if shots == 0 else seed
        for row in self.scores:
            if (row["model"], row["task"], row["shots"], row["seed"], row["metric"]) == (model, task, shots, seed, metric):
                return row["value"]
        raise KeyError((model, task, shots, seed, metric))

    def accuracy(self, model: str, task: str, shots: int) -> tuple[float, float]:
        """Mean and standard deviation over seeds of the task's metric (std 0 at 0 shots)."""
        values = [self.score(model, task, shots, seed) for seed in (self.seeds if shots else self.seeds[:1])]
        return statistics.fmean(values), sample_std(values)

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
