"""What attaching adapters trained: one row per target, printed at the start of a run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReportRow:
    target: str
    modules: int
    parameters: int


@dataclass
class AdapterReport:
    rows: list[ReportRow]
    base_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r.parameters for r in self.rows)

    def format(self) -> str:
        lines = [f"{'target':<14}{'modules':>9}{'parameters':>14}{'share of base':>16}"]
        for r in self.rows + [ReportRow("total", sum(r.modules for r in self.rows), self.trainable)]:
            share = 100.0 * r.parameters / max(self.base_parameters, 1)
            lines.append(f"{r.target:<14}{r.modules:>9}{r.parameters:>14,}{share:>15.3f}%")
        lines.append(f"base model: {self.base_parameters:,} parameters, frozen")
        return "\n".join(lines + self.notes)
