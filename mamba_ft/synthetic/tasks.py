"""Every synthetic task by name: the lookup that specs and the command line use."""

from __future__ import annotations

from mamba_ft.errors import UserError, did_you_mean
from mamba_ft.synthetic.base import Task
from mamba_ft.synthetic.copying import CopyTask, PrefixNgramTask, SuffixNgramTask
from mamba_ft.synthetic.cot import ArithmeticTask, LISTask, LocalSumTask, NonlocalSumTask
from mamba_ft.synthetic.recall import RecallTask, ZoologyRecallTask


def _registry() -> dict[str, type[Task]]:
    return {cls.name: cls for cls in (CopyTask, PrefixNgramTask, SuffixNgramTask, RecallTask,
                                      ZoologyRecallTask, ArithmeticTask, LISTask, LocalSumTask,
                                      NonlocalSumTask)}


def task_names() -> list[str]:
    return sorted(_registry())


def make_task(name: str, **params) -> Task:
    """The task `name` with its parameters checked; a UserError names any bad value."""
    registry = _registry()
    if name not in registry:
        raise UserError(f"Unknown synthetic task {name!r}; choose one of: {', '.join(sorted(registry))}."
                        + did_you_mean(name, registry))
    cls = registry[name]
    try:
        return cls(**params)
    except TypeError as exc:
        raise UserError(f"Bad parameters for task {name!r} ({exc}); its parameters are: "
                        f"{', '.join(cls.parameter_names())}.") from None
