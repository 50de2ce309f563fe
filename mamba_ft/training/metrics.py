"""What a run reports: metrics.jsonl, trackers (TensorBoard, W&B), the progress bar, peak
memory and the loss-curve plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mamba_ft.errors import UserError


class Metrics:
    """metrics.jsonl: one JSON row per logged step (train) or eval, written by the main process."""

    def __init__(self, path: Path, accelerator, keep_through: int, fresh: bool):
        self.path, self.accelerator = path, accelerator
        if accelerator.is_main_process:
            rows = [] if fresh or not path.exists() else [json.loads(line) for line in path.read_text().splitlines() if line]
            # On resume, rows written after the checkpoint's step belong to the lost future.
            rows = [r for r in rows if r["step"] <= keep_through]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict, trackers) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def log_step(self, step: int, total_steps: int, every: int, batches, started: float, values: dict,
                 trackers, progress) -> None:
        """One optimizer step's row (every `every` steps and the last) and the progress bar:
        `values` plus tokens/s over the whole global batch and peak memory."""
        accelerator = self.accelerator
        tokens = int(accelerator.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in batches),
                                                     device=accelerator.device), "sum"))
        tokens_per_s = tokens / max(time.perf_counter() - started, 1e-9)
        if step % every == 0 or step == total_steps:
            row = {"step": step, "loss": values["loss"], "lr": values["lr"], "grad_norm": values["grad_norm"],
                   "tokens_per_s": round(tokens_per_s, 1), "peak_memory_mb": peak_memory_mb(),
                   "skipped_steps": values["skipped_steps"]}
            self.write(row, trackers)
        if progress is not None:
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            progress.update(1)

    def first_eval(self) -> float | None:
        if not self.path.exists():
            return None
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if "eval_loss" in row:
                return row["eval_loss"]
        return None


def progress(cfg_log, total_steps: int, step: int, accelerator):
    if not (cfg_log.progress_bar and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def plot_losses(metrics_path: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def trackers(cfg_log) -> list[str]:
    trackers = []
    if cfg_log.tensorboard:
        trackers.append("tensorboard")
    if cfg_log.wandb_project:
        trackers.append("wandb")
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in trackers:
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"logging asks for {name} but the {module} package is not installed; "
                                f"pip install {module}, or turn it off in the recipe.") from None
    return trackers
