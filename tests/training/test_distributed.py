"""FSDP2 and the launch checks on CPU: real `accelerate launch` runs, 2 processes over gloo.

The reference is the same recipe in one process with the whole global batch (micro-batch 4 vs
2 processes x 2): per-step losses, the saved adapter / model tensors and the logits of what was
saved must agree. The GPU versions (bf16; DDP and FSDP2 against one GPU) are in
tests/training/test_distributed_gpu.py; the DDP CPU test is tests/training/test_train.py::test_two_processes_...

Tolerances (fp32 on CPU): FSDP2 reduce-scatters gradients, summing the two processes' halves in
another order than one process's backward, so gradients differ by float32 rounding (~1e-7
relative). Losses: abs 1e-5 (measured 1.3e-7 after 3 steps). Saved tensors: AdamW divides each
update by sqrt(v), so an entry whose gradient is near zero turns that rounding into an update
difference of up to a fraction of the learning rate (1e-2): measured 2.3e-5 absolute on entries
of size ~0.5, so abs 2e-4. Logits: 1e-4 of the largest logit (those differences through 4 blocks).
A resumed run replays the same processes on the same shards: abs 1e-6.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from distributed_runs import CONFIGS, launch, logits_of, probes, saved_tensors, step_losses, write_recipe

from mamba_ft.training import distributed
from mamba_ft.errors import UserError
from mamba_ft.recipe import load_recipe
from mamba_ft.training.loop import train

LORA_ALL = {"targets": ["all", "embeddings", "lm_head"], "rank": 4}  # every Mamba target
IDS = torch.randint(3, 272, (2, 24), generator=torch.Generator().manual_seed(5))


def _one_process(recipe, out):
    """The reference: one process, the whole global batch (2 processes x micro-batch 2)."""
    train(load_recipe(recipe, [f"run.output_dir={out}", "run.micro_batch_size=4"]))
    return out


def _assert_same_run(two, one):
    assert step_losses(two) == pytest.approx(step_losses(one), abs=1e-5)
    got, want = saved_tensors(two), saved_tensors(one)
    assert want and got.keys() == want.keys()
    for name, tensor in want.items():
        assert tensor.numel() > 0 and got[name].shape == tensor.shape, name  # whole, not shards
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=2e-4, msg=name)
    ref = logits_of(one, IDS)
    torch.testing.assert_close(logits_of(two, IDS), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.slow
def test_fsdp2_lora_on_all_targets_matches_one_process_and_resumes(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "two", LORA_ALL, save_every=2)
    launch("fsdp2.yaml", recipe)  # the documented command: accelerate launch ... -m mamba_ft.cli train
    _assert_same_run(tmp_path / "two", _one_process(recipe, tmp_path / "one"))

    # Resume from step 2 with the same 2 processes: the uninterrupted step 3 and adapter.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("adapter"))
    launch("fsdp2.yaml", recipe, [f"run.output_dir={resumed}", "run.resume=auto"])
    assert step_losses(resumed) == pytest.approx(step_losses(tmp_path / "two"), abs=1e-6)
    for name, tensor in saved_tensors(tmp_path / "two").items():
        torch.testing.assert_close(saved_tensors(resumed)[name], tensor, rtol=0, atol=1e-6)

    # One process cannot continue a 2-process checkpoint (per-process RNG and data position).
    with pytest.raises(UserError, match="written by 2 processes and this run has 1"):
        train(load_recipe(recipe, [f"run.output_dir={tmp_path / 'other'}",
                                   f"run.resume={tmp_path / 'two' / 'checkpoints' / 'step-2'}"]))


@pytest.mark.slow
def test_fsdp2_full_finetuning_matches_one_process_and_ops_see_gathered_weights(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "two", None)
    launch("fsdp2.yaml", recipe, worker=True)  # the worker records what the ops received
    seen = probes(tmp_path / "two")
    assert len(seen) == 2
    for record in seen:
        # Outside the forward a block's parameter is a shard (half the rows of in_proj) ...
        assert record["shard"] == {"type": "DTensor", "full": [384, 96], "local": [192, 96]}
        # ... inside it the mixer and the ops get the full tensors (d_inner 192, N 16, width 4).
        assert record["in_proj_weight"] == [[384, 96]]
        assert record["conv_weight"] == [[192, 4]]
        assert record["scan_A"] == [[192, 16]] and record["scan_D"] == [[192]]
    _assert_same_run(tmp_path / "two", _one_process(recipe, tmp_path / "one"))


@pytest.mark.slow
def test_fsdp2_transformer_baseline_shards_decoder_layers_and_matches_one_process(tmp_path):
    """GPT-NeoX with PEFT LoRA: one FSDP2 unit per GPTNeoXLayer (its _no_split_modules)."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "two", {"targets": ["all_linear"], "rank": 4},
                          source="bundled:tiny-gpt-neox")
    launch("fsdp2.yaml", recipe)
    _assert_same_run(tmp_path / "two", _one_process(recipe, tmp_path / "one"))


def test_checkpoint_of_another_layout_is_refused(tmp_path):
    """A DDP / one-device checkpoint keys its optimizer state by index, FSDP2's by name."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "a", {"targets": ["in_proj"], "rank": 2},
                          max_steps=1, save_every=1)
    train(load_recipe(recipe))
    state_file = tmp_path / "a" / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["layout"] == "replicated"
    state_file.write_text(json.dumps({**state, "layout": "fsdp2"}))
    with pytest.raises(UserError, match="written by a fsdp2 launch"):
        train(load_recipe(recipe, [f"run.output_dir={tmp_path / 'b'}",
                                   f"run.resume={state_file.parent}"]))


def test_fsdp1_deepspeed_and_unsupported_fsdp2_options_are_refused(monkeypatch, tmp_path):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS",
                 "FSDP_RESHARD_AFTER_FORWARD", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_AUTO_WRAP_POLICY"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.fsdp2_from_launch() is None  # no launcher, or DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP1 .*configs/accelerate/fsdp2.yaml"):
        distributed.fsdp2_from_launch()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "MambaBlock")
    assert distributed.fsdp2_from_launch() == distributed.Fsdp2Settings(True, ("MambaBlock",))
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    with pytest.raises(UserError, match="TRANSFORMER_BASED_WRAP"):
        distributed.fsdp2_from_launch()
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(UserError, match="fsdp_offload_params"):
        distributed.fsdp2_from_launch()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed .*configs/accelerate/ddp.yaml"):
        distributed.fsdp2_from_launch()
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", LORA_ALL)
    distributed.check_fsdp2_recipe(load_recipe(recipe))
    with pytest.raises(UserError, match="fp16 is not supported with FSDP2"):
        distributed.check_fsdp2_recipe(load_recipe(recipe, ["precision.mode=fp16"]))
    with pytest.raises(UserError, match="merge_at_end is not supported with FSDP2.*mamba-ft merge"):
        distributed.check_fsdp2_recipe(load_recipe(recipe, ["run.merge_at_end=true"]))
    with pytest.raises(UserError, match="frozen_base bf16 is not supported with FSDP2"):
        distributed.check_fsdp2_recipe(load_recipe(recipe, ["adapter.frozen_dtype=bfloat16"]))


def test_fsdp2_config_is_fsdp_version_2_for_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIGS / "fsdp2.yaml"))
    assert config.distributed_type.value == "FSDP" and config.num_processes == 2
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_saved_shapes_check_catches_shards():
    distributed.check_saved_shapes([(4, 2), (8,)], [(8,), (4, 2)], "x")
    with pytest.raises(RuntimeError, match="did not gather"):
        distributed.check_saved_shapes([(2, 2), (8,)], [(8,), (4, 2)], "x")  # a half shard
    with pytest.raises(RuntimeError, match="did not gather"):
        distributed.check_saved_shapes([(0, 2), (8,)], [(8,), (0, 2)], "x")  # empty
