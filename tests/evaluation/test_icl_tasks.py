"""Task lookup and data: the bundled rule tasks, unknown names, standard tasks offline / local."""

from __future__ import annotations

import json

import pytest
from icl_tiny_models import reference, reference_loglikelihood

from mamba_ft.errors import UserError
from mamba_ft.evaluation import ModelSpec, run_icl_sweep
from mamba_ft.evaluation.icl_task_data import TASKS_DIR, write_tasks
from mamba_ft.evaluation.tasks import bundled_task_names, resolve_tasks, task_manager
from mamba_ft.rules import RULES, apply_rule


def test_committed_task_files_are_what_the_script_writes(tmp_path):
    written = write_tasks(tmp_path)
    assert len(written) == 3 * len(RULES)  # a YAML and two splits per rule
    for path in written:
        assert path.read_bytes() == (TASKS_DIR / path.name).read_bytes(), path.name
    assert bundled_task_names() == sorted(f"icl_{rule}" for rule in RULES)


def test_rule_task_prompts_are_k_demonstrations_of_the_rule(tmp_path):
    manager = task_manager(["icl_copy"])
    names = bundled_task_names()
    tasks = manager.load(names)["tasks"]
    for name in names:
        rule = name.removeprefix("icl_")
        task = tasks[name]
        for k in (0, 3):
            task.set_config(key="num_fewshot", value=k)
            task.set_fewshot_seed(seed=7)
            task.build_all_requests(limit=4, rank=0, world_size=1)
            by_doc = {}
            for inst in task.instances:
                by_doc.setdefault(inst.doc_id, []).append(inst)
            for doc_id, instances in by_doc.items():
                context = instances[0].args[0]
                lines = context.split("\n")
                # Checked against the rule functions themselves, not against the data files.
                assert len(lines) == k + 1
                for line in lines[:-1]:
                    word, output = line.removeprefix("Q: ").split(" A: ")
                    assert output == apply_rule(rule, word)
                query = lines[-1].removeprefix("Q: ").removesuffix(" A:")
                assert lines[-1] == f"Q: {query} A:"
                continuations = [inst.args[1] for inst in instances]
                assert continuations == [f" {apply_rule(r, query)}\n" for r in RULES]
                assert len(set(continuations)) == len(RULES)  # one right answer
                gold = instances[0].doc["label"]
                assert continuations[gold] == f" {apply_rule(rule, query)}\n"


def test_unknown_task_lists_close_matches():
    for wrong, right in (("icl_reverze", "icl_reverse"), ("hellaswg", "hellaswag")):
        with pytest.raises(UserError, match=right) as info:
            resolve_tasks([wrong], task_manager([wrong]))
        assert "Unknown task" in str(info.value)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    # The test must not depend on what this machine happens to have cached.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_standard_task_offline_names_the_dataset_and_the_fix(tiny_mamba_dir, tmp_path, empty_hf_cache):
    with pytest.raises(UserError) as info:
        run_icl_sweep([ModelSpec("m", str(tiny_mamba_dir))], tasks="hellaswag", shots=(0, 1), seeds=(1,))
    message = str(info.value)
    assert "'Rowan/hellaswag'" in message or "Rowan/hellaswag" in message
    assert "train, validation" in message
    assert "--data hellaswag=DIR" in message
    assert "DIR/train.jsonl and DIR/validation.jsonl" in message


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_local_copy_of_a_standard_task_is_scored(tiny_mamba_dir, tmp_path, empty_hf_cache):
    data = tmp_path / "piqa"
    data.mkdir()
    goals = ["open a jar", "dry a towel", "cool the soup", "light a room", "cut paper"]
    rows = [{"goal": g, "sol1": f"use the {w}", "sol2": f"ask a {v}", "label": i % 2}
            for i, (g, w, v) in enumerate(zip(goals, ["lid", "sun", "fan", "lamp", "knife"],
                                                  ["cat", "dog", "fish", "bird", "cow"]))]
    _write_jsonl(data / "train.jsonl", rows)
    _write_jsonl(data / "validation.jsonl", rows[:4])
    result = run_icl_sweep([ModelSpec("m", str(tiny_mamba_dir))], tasks="piqa", shots=(0, 1), seeds=(1, 2),
                           local_data={"piqa": data}, batch_size=4)
    assert result.tasks == {"piqa": "acc"}
    # 0-shot accuracy recomputed by hand from the same four documents with plain transformers,
    # following lm-eval's piqa prompt ("Question: {goal}\nAnswer:" + " " + solution).
    ref_model, tok = reference(tiny_mamba_dir)
    correct = 0
    for row in rows[:4]:
        context = f"Question: {row['goal']}\nAnswer:"
        scores = [reference_loglikelihood(ref_model, tok, context, " " + row[s]) for s in ("sol1", "sol2")]
        correct += int(scores.index(max(scores)) == row["label"])
    assert result.score("m", "piqa", 0, None) == pytest.approx(correct / 4)
    assert {(row["shots"], row["seed"]) for row in result.scores} == {(0, None), (1, 1), (1, 2)}


def test_local_data_missing_split_is_a_clear_error(tiny_mamba_dir, tmp_path):
    data = tmp_path / "piqa"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(UserError, match="no 'validation' split"):
        run_icl_sweep([ModelSpec("m", str(tiny_mamba_dir))], tasks="piqa", shots=(0, 1), seeds=(1,),
                      local_data={"piqa": data})
