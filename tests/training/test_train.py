"""The training loop: loss normalisation against a hand-written reference step, resume,
output_dir guards, non-finite loss, Transformer baseline, 2-process gloo launch, quickstart."""

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

import mamba_ft.training.loop as train_mod
import mamba_ft.training.setup as setup_mod
import mamba_ft.training.step as step_mod
from mamba_ft.training import run_dir
from mamba_ft.cli import main
from mamba_ft.errors import UserError
from mamba_ft.models import load_model
from mamba_ft.recipe import load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[2]
TINY_MAMBA = {"model_type": "mamba", "vocab_size": 272, "hidden_size": 16, "state_size": 4,
              "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}
TINY_NEOX = {"model_type": "gpt_neox", "vocab_size": 272, "hidden_size": 16, "num_attention_heads": 2,
             "intermediate_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 64}


def recipe_dict(out, **run):
    return {
        "model": {"source": dict(TINY_MAMBA), "tokenizer": "bundled:tokenizer", "init_seed": 0},
        "adapter": None,
        "data": {"train": {"icl_rules": {"n_documents": 32, "seed": 0, "min_demos": 1, "max_demos": 3}},
                 "eval": {"icl_rules": {"n_documents": 8, "seed": 1, "min_demos": 1, "max_demos": 3}},
                 "max_length": 48},
        "optim": {"lr": 1e-2},
        "run": {"output_dir": str(out), "max_steps": 3, "micro_batch_size": 2, **run},
        "logging": {"progress_bar": False, "plot": False},
    }


def token_dataset(seed=0, n=12):
    """Rows of different lengths and different numbers of targets: normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for i in range(n):
        length = 4 + i % 5
        ids = torch.randint(2, 272, (length,), generator=g).tolist()
        masked = i % 3  # first tokens not targets, as a prompt would be
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * masked + ids[masked:])
    return datasets.Dataset.from_dict(rows)


def test_step_matches_manual_reference_and_split_invariance(tmp_path):
    """One optimizer step == per-token mean CE over the global batch + plain AdamW, for every split."""
    data = token_dataset()
    base = load_model(TINY_MAMBA, need_tokenizer=False, seed=0).model
    losses = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        d = recipe_dict(tmp_path / f"m{micro}", micro_batch_size=micro, grad_accum_steps=accum, max_steps=1)
        d["schedule"] = {"kind": "constant"}
        d["optim"] = {"lr": 1e-3, "max_grad_norm": None}
        model = copy.deepcopy(base)
        result = train_mod.train(validate_recipe(d), model=model, train_dataset=data)
        # On a machine with a GPU the run trains there; the reference below runs on the CPU.
        losses[(micro, accum)] = (result.step_losses[0], [p.detach().cpu() for p in model.parameters()])

    # Reference: the first global batch is the first 4 rows of the seed-0 permutation.
    reference = copy.deepcopy(base)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()[:4]
    total, count = 0.0, 0
    for i in order:
        ids = torch.tensor([data[i]["input_ids"]])
        labels = torch.tensor(data[i]["labels"][1:])
        logits = reference(input_ids=ids, use_cache=False).logits[0, :-1]
        total = total + F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    loss = total / count
    loss.backward()
    loss = loss.detach()
    torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0).step()
    for key, (step_loss, params) in losses.items():
        # fp32 on CPU; only the summation order differs between splits: 1e-6.
        assert step_loss == pytest.approx(loss.item(), rel=1e-6, abs=1e-6), key
        for p, q in zip(params, reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    full = train_mod.train(validate_recipe(recipe_dict(tmp_path / "full", max_steps=6, save_every=3)))

    calls = {"n": 0}
    real_forward = step_mod.forward_loss_sum

    def interrupt_at_step_4(model, batch, accelerator, backward_scale=None, **options):
        if backward_scale is not None:
            calls["n"] += 1
            if calls["n"] == 4:  # micro_batch_size 2, no accumulation: the 4th call is step 4
                raise KeyboardInterrupt
        return real_forward(model, batch, accelerator, backward_scale, **options)

    monkeypatch.setattr(step_mod, "forward_loss_sum", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(validate_recipe(recipe_dict(tmp_path / "cut", max_steps=6, save_every=3)))
    monkeypatch.setattr(step_mod, "forward_loss_sum", real_forward)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-3"]

    resumed = train_mod.train(validate_recipe(recipe_dict(tmp_path / "cut", max_steps=6, save_every=3,
                                                          resume="auto")))
    # fp32, CPU, the same batches and RNG: the tolerance 1e-6.
    assert resumed.step_losses == pytest.approx(full.step_losses, abs=1e-6)
    assert resumed.final_eval_loss == pytest.approx(full.final_eval_loss, abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_output_dir_guards(tmp_path):
    d = recipe_dict(tmp_path / "run", max_steps=1)
    train_mod.train(validate_recipe(d))
    written = (tmp_path / "run" / "recipe.yaml").read_text()
    assert validate_recipe(__import__("yaml").safe_load(written)) == validate_recipe(d)
    with pytest.raises(UserError, match="already holds this run"):
        train_mod.train(validate_recipe(d))
    other = recipe_dict(tmp_path / "run", max_steps=1)
    other["optim"]["lr"] = 5e-3
    with pytest.raises(UserError, match="different run"):
        train_mod.train(validate_recipe(other))
    other["run"]["overwrite"] = True
    train_mod.train(validate_recipe(other))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no mamba-ft run"):
        train_mod.train(validate_recipe(recipe_dict(foreign, max_steps=1)))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_forward = step_mod.forward_loss_sum
    calls = {"n": 0}

    def nan_at_step_3(model, batch, accelerator, backward_scale=None, **options):
        loss = real_forward(model, batch, accelerator, backward_scale, **options)
        if backward_scale is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(step_mod, "forward_loss_sum", nan_at_step_3)
    with pytest.raises(UserError) as info:
        train_mod.train(validate_recipe(recipe_dict(tmp_path, max_steps=5, save_every=1)))
    # Step 3 started from the weights of step-2, so step-2 is set aside and step-1 is named.
    message = str(info.value)
    assert "became nan at step 3" in message and f"is {tmp_path / 'checkpoints' / 'step-1'};" in message
    assert (tmp_path / "checkpoints" / "step-1" / "trainer_state.json").is_file()
    assert (tmp_path / "checkpoints" / "nonfinite-step-2" / "trainer_state.json").is_file()
    assert run_dir.latest_checkpoint(tmp_path).name == "step-1"  # what resume: auto takes


def test_nonfinite_stop_names_a_checkpoint_that_resumes_finite(tmp_path):
    """A huge lr (warmed up over 4 steps) breaks the model for real: the loss of step 4 is NaN
    because the update of step 3 ruined the weights. The checkpoint named as last good must
    give a finite loss when training resumes from it."""
    d = recipe_dict(tmp_path / "run", max_steps=12, save_every=1)
    d["optim"]["lr"] = 100.0
    d["schedule"] = {"warmup_steps": 4}
    with pytest.raises(UserError, match="became nan") as info:
        train_mod.train(validate_recipe(d))
    named = Path(re.search(r"last good checkpoint.*? is (\S*step-\d+)", str(info.value)).group(1))
    step = int(named.name.split("-")[1])
    again = recipe_dict(tmp_path / "again", max_steps=step + 1, resume=str(named))
    again["optim"]["lr"], again["schedule"] = 100.0, {"warmup_steps": 4}
    resumed = train_mod.train(validate_recipe(again))
    assert len(resumed.step_losses) == step + 1 and math.isfinite(resumed.step_losses[-1])


def logged_lrs(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def reference_lrs(lr, warmup, total):
    """The lr of each step (1-based) of a fresh transformers cosine schedule over `total` steps."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    lrs = {}
    for step in range(1, total + 1):
        lrs[step] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    return lrs


def test_resume_takes_the_schedule_from_the_recipe(tmp_path, capsys):
    """Resuming with a longer run.max_steps and another optim.lr continues the recipe's
    schedule from the checkpoint's step (no lr 0 from the old schedule's end, no old lr)."""
    d = recipe_dict(tmp_path / "run", max_steps=4, save_every=2)
    d["schedule"] = {"kind": "cosine", "warmup_steps": 1}
    train_mod.train(validate_recipe(d))
    assert logged_lrs(tmp_path / "run") == pytest.approx(reference_lrs(1e-2, 1, 4), rel=1e-12)

    d["run"].update(max_steps=6, resume="auto")
    d["optim"]["lr"] = 5e-3
    capsys.readouterr()
    train_mod.train(validate_recipe(d))
    lrs, expected = logged_lrs(tmp_path / "run"), reference_lrs(5e-3, 1, 6)
    assert [lrs[s] for s in (5, 6)] == pytest.approx([expected[5], expected[6]], rel=1e-12)
    printed = capsys.readouterr().out
    assert "at step 4" in printed and "lr 0.01 -> 0.005" in printed and "total_steps 4 -> 6" in printed

    # Into a new directory from a mid-run checkpoint, as the issue did it.
    other = recipe_dict(tmp_path / "other", max_steps=4, resume=str(tmp_path / "run" / "checkpoints" / "step-4"))
    other["schedule"] = {"kind": "cosine", "warmup_steps": 1}
    other["optim"]["lr"] = 1e-4
    other["run"]["max_steps"] = 8
    train_mod.train(validate_recipe(other))
    lrs, expected = logged_lrs(tmp_path / "other"), reference_lrs(1e-4, 1, 8)
    assert sorted(lrs) == [5, 6, 7, 8]
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)], rel=1e-12)


def test_failed_start_leaves_nothing_that_blocks_the_fix(tmp_path):
    """A typo in a data path must not leave a recipe.yaml behind that makes the corrected
    command 'a different run'."""
    d = recipe_dict(tmp_path / "run", max_steps=1)
    good_train = d["data"]["train"]
    d["data"]["train"] = {"path": str(tmp_path / "tarin.jsonl")}
    with pytest.raises(UserError, match="does not exist"):
        train_mod.train(validate_recipe(d))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    d["data"]["train"] = good_train
    assert train_mod.train(validate_recipe(d)).steps == 1


def test_overwrite_never_writes_among_other_files(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no mamba-ft run"):
        train_mod.train(validate_recipe(recipe_dict(foreign, max_steps=1, overwrite=True)))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    # A previous run's folder to which the user added a file of their own: refused, untouched.
    run = tmp_path / "run"
    train_mod.train(validate_recipe(recipe_dict(run, max_steps=1)))
    (run / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UserError, match="also holds notes.txt"):
        train_mod.train(validate_recipe(recipe_dict(run, max_steps=2, overwrite=True)))
    assert sorted(p.name for p in run.iterdir()) == before
    (run / "notes.txt").unlink()
    assert train_mod.train(validate_recipe(recipe_dict(run, max_steps=2, overwrite=True))).steps == 2


def test_transformer_baseline_trains_and_refuses_packing(tmp_path):
    d = recipe_dict(tmp_path / "neox", max_steps=2)
    d["model"]["source"] = dict(TINY_NEOX)
    result = train_mod.train(validate_recipe(d))
    assert (result.saved_to / "config.json").is_file() and result.final_eval_loss < result.initial_eval_loss
    d["data"]["packing"] = True
    d["run"]["output_dir"] = str(tmp_path / "neox-packed")
    with pytest.raises(UserError, match="packing is only supported for Mamba"):
        train_mod.train(validate_recipe(d))


def test_recompute_ssm_trains_the_same_and_refuses_transformers(tmp_path, monkeypatch):
    """model.recompute_ssm changes what the backward stores, not the training: per-step losses
    equal those of a plain run (same ops in the same order; 1e-6 for summation order)."""
    import mamba_ft.modules.mamba_mixer as mixer_mod

    plain = train_mod.train(validate_recipe(recipe_dict(tmp_path / "plain")))
    calls = []
    real_checkpoint = mixer_mod.checkpoint
    monkeypatch.setattr(mixer_mod, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    d = recipe_dict(tmp_path / "recompute")
    d["model"]["recompute_ssm"] = True
    recomputed = train_mod.train(validate_recipe(d))
    assert calls  # the mixers really ran their SSM branch under checkpointing
    assert recomputed.step_losses == pytest.approx(plain.step_losses, abs=1e-6)
    d = recipe_dict(tmp_path / "neox")
    d["model"].update(source=dict(TINY_NEOX), recompute_ssm=True)
    with pytest.raises(UserError, match="recompute_ssm applies to Mamba mixers only"):
        train_mod.train(validate_recipe(d))


def test_cli_bad_data_exits_2_without_traceback(tmp_path, capsys):
    d = recipe_dict(tmp_path / "out")
    d["data"]["train"] = {"path": str(tmp_path / "missing.jsonl")}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(__import__("yaml").safe_dump(d))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "does not exist" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_processes_reproduce_single_process(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), half the micro-batch each, gives the
    single-process per-step losses for the same global batch."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(__import__("yaml").safe_dump(recipe_dict(tmp_path / "two", micro_batch_size=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/cpu-2proc.yaml"), "-m", "mamba_ft.cli", "train", str(recipe)]
    proc = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train_mod.train(load_recipe(recipe, [f"run.output_dir={tmp_path / 'one'}", "run.micro_batch_size=4"]))
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in rows if "loss" in r]
    # fp32; gloo all-reduce sums the two halves in another order: 1e-6.
    assert two == pytest.approx(single.step_losses, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["bundled:tiny-mamba", "bundled:tiny-mamba2"])
def test_quickstart_recipe_learns_and_saves(tmp_path, capsys, source):
    out = tmp_path / "qs"
    result = train_mod.train_from_recipe(str(REPO / "recipes/quickstart.yaml"),
                                         [f"run.output_dir={out}", "run.max_steps=8", "run.save_every=8", "run.eval_batches=2",
                                          "logging.progress_bar=false", "run.merge_at_end=true",
                                          f"model.source={source}"])
    assert result.final_eval_loss < 0.5 * result.initial_eval_loss
    assert (out / "adapter").is_dir() and any((out / "adapter").iterdir())
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").stat().st_size > 0
    assert (out / "checkpoints" / "step-8").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"} <= set(rows[1])
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] == [result.initial_eval_loss, result.final_eval_loss]
    # The merged model is a plain checkpoint that reproduces the final eval loss.
    merged = load_model(out / "merged").model
    recipe = load_recipe(REPO / "recipes/quickstart.yaml", [f"run.output_dir={tmp_path / 'eval-merged'}",
                                                            f"model.source={source}",
                                                            "run.max_steps=1", "optim.lr=1e-30",
                                                            "run.eval_batches=2", "adapter=none",
                                                            "logging.progress_bar=false"])
    again = train_mod.train(recipe, model=merged)
    # fp32; merged weights W + s*B*A vs the unmerged side paths: summation order only.
    assert again.initial_eval_loss == pytest.approx(result.final_eval_loss, rel=1e-4)
    printed = capsys.readouterr().out
    assert str(out / "adapter") in printed and str(out / "loss.png") in printed


def test_epochs_set_the_step_count(tmp_path):
    d = recipe_dict(tmp_path / "ep", max_steps=None, epochs=0.5)
    d["data"]["eval"] = None
    result = train_mod.train(validate_recipe(d))
    # 32 documents / global batch 2 = 16 steps per epoch; half an epoch is 8 steps.
    assert result.steps == 8 and result.initial_eval_loss is None


def test_missing_tracker_package_is_a_user_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    d = recipe_dict(tmp_path / "tb")
    d["logging"]["tensorboard"] = True
    with pytest.raises(UserError, match="pip install tensorboard"):
        train_mod.train(validate_recipe(d))


def test_recipe_icl_sweep_runs_after_training_against_the_base(tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "icl-run"
    result = train_mod.train_from_recipe(str(REPO / "recipes/quickstart.yaml"), [
        f"run.output_dir={out}", "run.max_steps=2", "run.eval_batches=1", "logging.progress_bar=false",
        "logging.plot=false", "evaluation.icl_sweep={tasks: [icl_copy], shots: [0, 1], seeds: [1], limit: 4}"])
    sweep = result.evaluation["icl_sweep"]
    # The fine-tuned model in memory and its base checkpoint ("before") are both scored, and
    # the ratio is the fine-tuned gain over the base gain, as the report defines it.
    assert set(sweep["gains"]) == {"fine-tuned", "base"}
    assert sweep["ratios"]["fine-tuned"]["ratio"] == pytest.approx(
        sweep["gains"]["fine-tuned"]["mean"] / sweep["gains"]["base"]["mean"])
    rows = json.loads((out / "icl" / "results.json").read_text())
    assert rows  # the report lands inside the run's output_dir


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_unsupported_launches_are_refused_with_the_ddp_config(kind):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    with pytest.raises(UserError, match="configs/accelerate/ddp.yaml"):
        setup_mod.check_distributed(SimpleNamespace(distributed_type=DistributedType[kind]))


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        # Accelerate's own loader: unknown keys or a wrong distributed_type raise.
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.num_processes >= 1, path


def test_frozen_weights_kept_in_bf16_train_like_fp32_ones(tmp_path, monkeypatch):
    """adapter.frozen_dtype: bfloat16 stores the frozen base in bf16, keeps the recurrence
    parameters, norms and adapters fp32, and trains like the fp32 base under bf16 autocast."""
    import mamba_ft.precision as precision_mod

    def lora_recipe(out, **adapter):
        d = recipe_dict(out)
        d["adapter"] = {"targets": ["all"], "rank": 4, **adapter}
        d["precision"] = {"mode": "bf16"}
        return d

    fp32_base = train_mod.train(validate_recipe(lora_recipe(tmp_path / "fp32")))
    seen = {}
    real = precision_mod.store_frozen_in

    def record(model, dtype):
        moved = real(model, dtype)
        seen.update({name: p.dtype for name, p in model.named_parameters()})
        return moved

    monkeypatch.setattr(precision_mod, "store_frozen_in", record)
    bf16_base = train_mod.train(validate_recipe(lora_recipe(tmp_path / "bf16", frozen_dtype="bfloat16")))
    assert seen["backbone.layers.0.mixer.in_proj.weight"] == torch.bfloat16
    assert seen["backbone.embeddings.weight"] == torch.bfloat16
    for name in ("backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D",
                 "backbone.layers.0.norm.weight", "backbone.layers.0.mixer.dt_proj.bias"):
        assert seen[name] == torch.float32, name
    assert all(dtype == torch.float32 for name, dtype in seen.items() if "adapter" in name)
    # Autocast runs the matmuls in bf16 either way; what differs is the bf16 rounding of the
    # embeddings and the conv weights (relative 2^-9): ~1e-4 relative on these losses.
    assert bf16_base.step_losses == pytest.approx(fp32_base.step_losses, rel=2e-3)

    with pytest.raises(UserError, match="merge_at_end would merge into base weights"):
        d = lora_recipe(tmp_path / "merge", frozen_dtype="bfloat16")
        d["run"]["merge_at_end"] = True
        validate_recipe(d)


def test_logits_reach_the_loss_in_the_autocast_dtype(tmp_path, monkeypatch):
    """Under bf16 the Transformer baseline's loss receives bf16 logits: Accelerate's prepare()
    wraps the forward in a cast of its outputs to fp32, a full fp32 copy of the logits that
    mamba_ft.training.loss exists to avoid, and the training loop drops that wrapper (it enters
    autocast itself). (transformers' MambaForCausalLM casts its logits to fp32 in its own
    forward, so a Mamba's loss sees fp32 either way.)"""
    seen = []
    real = step_mod.next_token_loss_sum

    def record(logits, labels, ignore_index):
        seen.append(logits.dtype)
        return real(logits, labels, ignore_index)

    monkeypatch.setattr(step_mod, "next_token_loss_sum", record)
    d = recipe_dict(tmp_path, max_steps=1)
    d["model"]["source"] = dict(TINY_NEOX)
    d["precision"] = {"mode": "bf16"}
    train_mod.train(validate_recipe(d))
    assert seen and set(seen) == {torch.bfloat16}


def test_resuming_a_finished_run_trains_and_writes_nothing(tmp_path, capsys):
    """The same command run again after the run ended: no training, no duplicate eval row, the
    files as they were, and one line saying so."""
    import yaml

    d = recipe_dict(tmp_path / "run", max_steps=4, save_every=2)
    first = train_mod.train(validate_recipe(d))
    metrics_before = first.metrics_path.read_text()
    adapter_or_model = sorted(p.name for p in first.output_dir.iterdir())
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({**d, "run": {**d["run"], "resume": "auto"}}))
    capsys.readouterr()
    again = train_mod.train_from_recipe(str(recipe_path))
    assert again.already_finished and again.steps == 4
    assert again.step_losses == first.step_losses
    assert first.metrics_path.read_text() == metrics_before
    assert sorted(p.name for p in first.output_dir.iterdir()) == adapter_or_model
    assert "nothing to train" in capsys.readouterr().out


def test_ctrl_c_says_where_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    import yaml

    real_forward = step_mod.forward_loss_sum
    calls = {"n": 0}

    def interrupt_at_step_4(model, batch, accelerator, backward_scale=None, **options):
        if backward_scale is not None:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real_forward(model, batch, accelerator, backward_scale, **options)

    monkeypatch.setattr(step_mod, "forward_loss_sum", interrupt_at_step_4)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict(tmp_path / "run", max_steps=6, save_every=3)))
    assert main(["train", str(recipe_path)]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "mamba-ft: interrupted" in captured.err
    newest = tmp_path / "run" / "checkpoints" / "step-3"
    assert f"interrupted at step 3 of 6: the newest checkpoint is {newest}" in captured.out
    assert "run.resume=auto" in captured.out


def test_cli_version_help_and_debug_after_the_subcommand(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"mamba-ft {version('mamba-ft')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "Fine-tune Mamba" in help_text and "parse the arguments" not in help_text
    with pytest.raises(UserError):  # --debug after the subcommand: the error is raised, not printed
        main(["info", "/nonexistent/model", "--debug"])
    assert main(["info", "/nonexistent/model"]) == 2


TINY_NEMOTRON_H = {"model_type": "nemotron_h", "vocab_size": 272, "hidden_size": 16,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
                   "layers_block_type": ["mamba", "attention", "mamba"], "num_hidden_layers": 3,
                   "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 1, "ssm_state_size": 4,
                   "conv_kernel": 4, "expand": 2, "chunk_size": 8}


def test_hybrid_recipe_trains_with_adapters_everywhere_packed_and_not(tmp_path):
    """A hybrid (Nemotron-H) through the same recipe: adapters on its Mamba layers and LoRA on
    its attention / MLP train and the loss falls, with and without packing (the packed path is
    tested against documents run apart in tests/models/test_model_types.py)."""
    d = recipe_dict(tmp_path / "hybrid", max_steps=6)
    d["model"]["source"] = dict(TINY_NEMOTRON_H)
    d["model"]["kind"] = "mamba"
    d["adapter"] = {"targets": ["all", "embeddings", "lm_head"], "rank": 4}
    result = train_mod.train(validate_recipe(d))
    assert result.final_eval_loss < result.initial_eval_loss
    d["data"]["packing"] = True
    d["run"]["output_dir"] = str(tmp_path / "hybrid-packed")
    packed = train_mod.train(validate_recipe(d))
    assert packed.final_eval_loss < packed.initial_eval_loss


@pytest.mark.parametrize("source", ["mamba", "nemotron_h"])
def test_checkpoint_blocks_recomputes_blocks_and_trains_the_same(tmp_path, monkeypatch, source):
    """model.checkpoint_blocks recomputes each block's forward in the backward (the mixers run
    twice per step) and changes nothing else: per-step losses equal a plain run's (1e-6,
    summation order), with adapters, for a Mamba and a hybrid."""
    from mamba_ft.modules import MambaFTMamba2Mixer, MambaFTMixer

    def run(out, checkpoint_blocks):
        d = recipe_dict(tmp_path / out, max_steps=2)
        if source == "nemotron_h":
            d["model"].update(source=dict(TINY_NEMOTRON_H), kind="mamba")
        d["model"]["checkpoint_blocks"] = checkpoint_blocks
        d["adapter"] = {"targets": ["all"], "rank": 4}
        return train_mod.train(validate_recipe(d))

    calls = []
    for cls in (MambaFTMixer, MambaFTMamba2Mixer):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _real=real, **k: calls.append(1) or _real(self, *a, **k))
    plain = run("plain", False)
    plain_calls = len(calls)
    calls.clear()
    checkpointed = run("blocks", True)
    # Each training forward runs again in the backward (2 steps x 2 Mamba layers); evaluation
    # (no gradient) does not.
    assert len(calls) - plain_calls == 2 * 2
    assert checkpointed.step_losses == pytest.approx(plain.step_losses, abs=1e-6)
    assert checkpointed.final_eval_loss == pytest.approx(plain.final_eval_loss, abs=1e-6)


def test_chunked_head_loss_trains_like_the_logits_path_and_is_refused_where_it_cannot_hold(tmp_path):
    """run.chunked_head_loss: the same per-step losses as a plain run (1e-6; the head's chunks
    sum in another order); refused for a model whose logits are scaled after the head, and
    with CUDA graphs, each one message before anything trains."""
    plain = train_mod.train(validate_recipe(recipe_dict(tmp_path / "plain", max_steps=3)))
    d = recipe_dict(tmp_path / "chunked", max_steps=3)
    d["run"]["chunked_head_loss"] = True
    chunked = train_mod.train(validate_recipe(d))
    assert chunked.step_losses == pytest.approx(plain.step_losses, abs=1e-6)
    assert chunked.final_eval_loss == pytest.approx(plain.final_eval_loss, abs=1e-6)
    d = recipe_dict(tmp_path / "granite", max_steps=1)
    d["model"].update(kind="mamba", source={
        "model_type": "granitemoehybrid", "vocab_size": 272, "hidden_size": 16,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
        "num_hidden_layers": 2, "layer_types": ["mamba", "attention"], "mamba_n_heads": 4,
        "mamba_d_head": 8, "mamba_n_groups": 1, "mamba_d_state": 4, "mamba_chunk_size": 8,
        "num_local_experts": 0})
    d["run"]["chunked_head_loss"] = True
    with pytest.raises(UserError, match="chunked_head_loss applies where the logits are the head"):
        train_mod.train(validate_recipe(d))
    d = recipe_dict(tmp_path / "graphs", max_steps=1)
    d["run"].update(chunked_head_loss=True, cuda_graphs=True)
    with pytest.raises(UserError, match="cuda_graphs"):
        train_mod.train(validate_recipe(d))
