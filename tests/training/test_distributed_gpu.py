"""DDP and FSDP2 on 2 GPUs against one GPU: bf16, 20 steps, LoRA on all targets and full FT.

Three launches of the same two recipes (bundled tiny Mamba, generated data, same global batch
of 4): one GPU with micro-batch 4 (no launcher), configs/accelerate/ddp.yaml and
configs/accelerate/fsdp2.yaml with 2 processes x micro-batch 2. Each launch trains both recipes
(tests/distributed_runs.py worker: one start-up, plus a record of the weight shapes the ops got).

    pytest -m gpu tests/training/test_distributed_gpu.py            # needs >= 2 CUDA GPUs (NCCL)

The same logic dry-runs on CPU (2 gloo processes, cpu-2proc.yaml for DDP, fp32, 4 steps):

    MAMBA_FT_DIST_GPU_TEST_ON_CPU=1 pytest -m gpu tests/training/test_distributed_gpu.py

MAMBA_FT_DIST_REPORT=FILE writes the measured differences as JSON (written before asserting);
MAMBA_FT_DIST_BUDGET=SECONDS bounds the three launches together (default 400): a launch that
would overrun is killed with its workers, and the tests fail instead of hanging.

Tolerance (bf16 autocast, fp32 parameters): 2 processes run micro-batch 2 where one GPU runs 4,
so matmuls take other kernels and sum in another order; bf16 keeps 8 mantissa bits (relative
rounding 4e-3), and AdamW turns rounding in near-zero gradients into update differences of up to
a fraction of the learning rate (1e-3), which accumulate over 20 steps. Losses: abs 0.03 per step
(2% of a loss ~1.5); logits of what was saved (computed in fp32): 3% of the largest logit.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from distributed_runs import launch, logits_of, probes, step_losses, write_recipe

ON_CPU = os.environ.get("MAMBA_FT_DIST_GPU_TEST_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not ON_CPU and torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

STEPS = 4 if ON_CPU else 20
LOSS_ATOL, LOGITS_REL = 0.03, 0.03
LAUNCHES = {  # name -> (accelerate config or None for one process, micro-batch per process)
    "one": (None, 4),
    "ddp": ("cpu-2proc.yaml" if ON_CPU else "ddp.yaml", 2),
    "fsdp2": ("fsdp2.yaml", 2),
}
RECIPES = {"lora": {"targets": ["all", "embeddings", "lm_head"], "rank": 8}, "full": None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train every recipe under every launch; measure the differences against one process."""
    root = tmp_path_factory.mktemp("dist-gpu")
    recipes = {}
    for name, adapter in RECIPES.items():
        recipes[name] = write_recipe(root / f"{name}.yaml", root / "unused", adapter, lr=1e-3,
                                     n_documents=4 * STEPS, precision="fp32" if ON_CPU else "bf16",
                                     max_steps=STEPS)
    deadline = time.monotonic() + float(os.environ.get("MAMBA_FT_DIST_BUDGET", "400"))
    for launch_name, (config, micro) in LAUNCHES.items():
        argv = []
        for name, recipe in recipes.items():
            argv += ["--next"] if argv else []
            argv += [str(recipe), f"run.output_dir={root / launch_name / name}", f"run.micro_batch_size={micro}"]
        env = {} if ON_CPU or config is not None else {"CUDA_VISIBLE_DEVICES": "0"}
        launch(config, argv[0], argv[1:], worker=True, cpu=ON_CPU, timeout=max(deadline - time.monotonic(), 1),
               env=env)

    ids = torch.randint(3, 272, (2, 32), generator=torch.Generator().manual_seed(7))
    device = "cpu" if ON_CPU else "cuda"
    report = {"steps": STEPS, "device": "cpu (dry run)" if ON_CPU else torch.cuda.get_device_name(),
              "tolerance": {"loss_abs": LOSS_ATOL, "logits_rel_to_max": LOGITS_REL}, "runs": {}}
    for name in RECIPES:
        ref_losses = step_losses(root / "one" / name)
        ref_logits = logits_of(root / "one" / name, ids, device)
        scale = ref_logits.abs().max().item()
        for launch_name in ("ddp", "fsdp2"):
            out = root / launch_name / name
            losses = step_losses(out)
            report["runs"][f"{launch_name}/{name}"] = {
                "losses": losses, "one_gpu_losses": ref_losses,
                "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)) if losses else None,
                "max_logit_diff_rel": (logits_of(out, ids, device) - ref_logits).abs().max().item() / scale,
                "probes": probes(out),
            }
    if os.environ.get("MAMBA_FT_DIST_REPORT"):
        path = os.environ["MAMBA_FT_DIST_REPORT"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return report


@pytest.mark.parametrize("run", ["ddp/lora", "ddp/full", "fsdp2/lora", "fsdp2/full"])
def test_two_processes_reproduce_one_gpu_losses_and_saved_logits(runs, run):
    result = runs["runs"][run]
    assert len(result["losses"]) == len(result["one_gpu_losses"]) == STEPS
    assert result["losses"] == pytest.approx(result["one_gpu_losses"], abs=LOSS_ATOL), result
    assert result["max_logit_diff_rel"] <= LOGITS_REL, result


@pytest.mark.parametrize("run", ["fsdp2/lora", "fsdp2/full"])
def test_fsdp2_blocks_are_sharded_and_the_mixer_reads_full_weights(runs, run):
    seen = runs["runs"][run]["probes"]
    assert len(seen) == 2
    for record in seen:
        assert record["shard"] == {"type": "DTensor", "full": [384, 96], "local": [192, 96]}
        assert record["in_proj_weight"] == [[384, 96]]
        # On CUDA a fused mixer path may bypass these two ops; when they run, they get full weights.
        assert record["conv_weight"] in ([], [[192, 4]]) and record["scan_A"] in ([], [[192, 16]])
