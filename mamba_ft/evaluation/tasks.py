"""Which lm-eval tasks a sweep runs, where their data comes from, and what each one scores.

Three kinds of task names are accepted:
- the bundled rule tasks (`icl_copy`, ... and the tag `mamba_ft_icl` for all of them), defined
  in `tasks/icl_rules/` inside this package and runnable with no network;
- the standard set of the Mamba papers (`STANDARD_TASKS`), by their lm-eval names; their data
  comes from the local Hugging Face cache, or from local files given with `local_data`;
- any other lm-eval task that reports `acc`.

Sweeps run offline by default (`offline_hub`): a dataset that is not already on the machine
is a clear error naming it and saying how to give a local copy, never a download or a retry
loop against an unreachable Hub.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamba_ft.errors import UserError

BUNDLED_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TAG = "mamba_ft_icl"

# The benchmarks of the Mamba papers and the metric each reports (Mamba paper App. E.2.3:
# accuracy, length-normalised for HellaSwag and ARC-challenge; OpenBookQA as in Mamba-2).
STANDARD_TASKS = {
    "lambada_openai": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "openbookqa": "acc_norm",
}

LOCAL_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass
class TaskSpec:
    """One task of a sweep: its lm-eval name, the metric the ICL gain uses, how to build it."""

    name: str
    metric: str
    bundled: bool
    config: str | dict[str, Any] = field(repr=False, default="")  # what TaskManager.load gets


def bundled_task_names() -> list[str]:
    # One YAML per task, named after it (icl_task_data writes them that way).
    return sorted(p.stem for p in (BUNDLED_TASKS_DIR / "icl_rules").glob("icl_*.yaml"))


def parse_task_list(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise UserError(f"No tasks given; name lm-eval tasks, e.g. {BUNDLED_TAG} (the bundled "
                        f"rule tasks) or {','.join(STANDARD_TASKS)}.")
    expanded: list[str] = []
    for name in names:
        for task in bundled_task_names() if name == BUNDLED_TAG else [name]:
            if task not in expanded:
                expanded.append(task)
    return expanded


@contextmanager
def offline_hub(enabled: bool = True):
    """Within the block the Hugging Face Hub is off for datasets and transformers.

    Both libraries read a module-level flag at call time (set from HF_HUB_OFFLINE when they
    are imported), so flipping the flag works even when they were imported earlier, e.g. by a
    training loop that calls the sweep.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


_MANAGERS: dict[bool, object] = {}


def task_manager(names: list[str]):
    """A TaskManager that knows the bundled tasks, and lm-eval's own only when a name needs it.

    Indexing lm-eval's ~15,000 task YAMLs takes seconds, so a sweep over bundled tasks skips
    it and the index is built once per process (a training loop may run several sweeps).
    """
    from lm_eval.tasks import TaskManager

    needs_defaults = any(name not in bundled_task_names() for name in names)
    if needs_defaults not in _MANAGERS:
        _MANAGERS[needs_defaults] = TaskManager(include_path=str(BUNDLED_TASKS_DIR),
                                                include_defaults=needs_defaults)
    return _MANAGERS[needs_defaults]


def resolve_tasks(names: list[str], manager, local_data: dict[str, str | Path] | None = None) -> list[TaskSpec]:
    """TaskSpecs for `names`, checked against the index; unknown names list close matches."""
    local_data = dict(local_data or {})
    for task in local_data:
        if task not in names:
            raise UserError(f"Local data was given for task {task!r}, which is not in the task "
                            f"list ({', '.join(names)}); add it to the tasks or drop its data.")
    bundled = set(bundled_task_names())
    specs = []
    for name in names:
        if name not in manager.task_index:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise UserError(f"Unknown task {name!r}.{hint} Use lm-eval task names, e.g. "
                            f"{BUNDLED_TAG} (all bundled rule tasks: {', '.join(sorted(bundled))}) "
                            f"or {', '.join(STANDARD_TASKS)}; `lm-eval ls tasks` lists them all.")
        config: str | dict[str, Any] = name
        if name in local_data:
            config = _config_with_local_data(name, manager, Path(local_data[name]))
        metric = "acc" if name in bundled else STANDARD_TASKS.get(name, "")
        specs.append(TaskSpec(name=name, metric=metric, bundled=name in bundled, config=config))
    return specs


def _task_yaml_config(name: str, manager, resolve_functions: bool) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.yaml_path is None:
        return dict(entry.cfg or {})
    return load_yaml(entry.yaml_path, resolve_func=resolve_functions)


def _splits_used(config: dict[str, Any]) -> list[str]:
    splits = [config.get(key) for key in _SPLIT_KEYS]
    fewshot = config.get("fewshot_config") or {}
    splits.append(fewshot.get("split") if isinstance(fewshot, dict) else None)
    return list(dict.fromkeys(s for s in splits if s))


def _config_with_local_data(name: str, manager, directory: Path) -> dict[str, Any]:
    """The task's own config, reading its splits from `directory/<split>.<ext>` instead."""
    config = _task_yaml_config(name, manager, resolve_functions=True)
    if "task" not in config:
        raise UserError(f"{name!r} is a group of tasks; give local data for its member tasks "
                        f"one by one.")
    splits = _splits_used(config)
    if not directory.is_dir():
        raise UserError(f"The local data directory for {name!r}, {directory}, does not exist; "
                        f"create it with {_files_hint(splits)} in the dataset's own columns.")
    files: dict[str, Path] = {}
    for split in splits:
        found = [directory / f"{split}{ext}" for ext in LOCAL_DATA_FORMATS if (directory / f"{split}{ext}").is_file()]
        if not found:
            raise UserError(f"The local data for {name!r} in {directory} has no {split!r} split; "
                            f"it needs {_files_hint(splits)} in the dataset's own columns.")
        files[split] = found[0]
    builders = {LOCAL_DATA_FORMATS[f.suffix] for f in files.values()}
    if len(builders) > 1:
        raise UserError(f"The local data for {name!r} in {directory} mixes file formats "
                        f"({', '.join(sorted(f.name for f in files.values()))}); use one format "
                        f"for all splits.")
    config.pop("custom_dataset", None)
    config.update(dataset_path=builders.pop(), dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(path) for split, path in files.items()}})
    return config


def _files_hint(splits: list[str], directory: str = "") -> str:
    prefix = f"{directory}/" if directory else ""
    return " and ".join(f"{prefix}{split}.jsonl" for split in splits) + " (or .parquet/.csv)"


def load_tasks(specs: list[TaskSpec], manager) -> dict[str, tuple[Any, str]]:
    """Build the lm-eval Task objects (loading their data) once for the whole sweep.

    Returns {task name: (Task, metric)}; a group expands to its member tasks, each scored by
    the group's metric when it has one, else by acc.
    """
    tasks: dict[str, Any] = {}
    for spec in specs:
        try:
            loaded = manager.load([spec.config])["tasks"]
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            raise _missing_data_error(spec, manager, exc) from None
        for name, task in loaded.items():
            metric = spec.metric or _default_metric(name, task)
            tasks[name] = (task, metric)
    return tasks


def _default_metric(name: str, task) -> str:
    metrics = [m["metric"] for m in (task.config.metric_list or []) if isinstance(m.get("metric"), str)]
    if "acc" in metrics:
        return "acc"
    raise UserError(f"Task {name!r} reports {', '.join(metrics) or 'no metric'}, not accuracy; "
                    f"the ICL sweep compares accuracy (acc), so pick multiple-choice or "
                    f"log-likelihood tasks.")


def _missing_data_error(spec: TaskSpec, manager, exc: Exception) -> UserError:
    if isinstance(spec.config, dict):  # local files were given and could not be read
        files = spec.config.get("dataset_kwargs", {}).get("data_files", {})
        return UserError(f"Could not read the local data for task {spec.name!r} "
                         f"({', '.join(str(p) for p in files.values())}): {str(exc).splitlines()[0]}. "
                         f"Check the files hold the splits in the dataset's own schema.")
    config = _task_yaml_config(spec.name, manager, resolve_functions=False)
    dataset = config.get("dataset_path") or "(none named)"
    if config.get("dataset_name"):
        dataset += f" (config {config['dataset_name']!r})"
    splits = _splits_used(config)
    return UserError(
        f"Task {spec.name!r} needs the Hugging Face dataset {dataset}, splits "
        f"{', '.join(splits)}, which is not on this machine (mamba-ft evaluates offline). Point "
        f"HF_HOME at a Hugging Face cache that holds it, or pass --online where a network "
        f"exists, or export its splits in the dataset's own columns to "
        f"{_files_hint(splits, 'DIR')} and pass --data {spec.name}=DIR.")
