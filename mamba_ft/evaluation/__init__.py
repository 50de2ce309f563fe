"""Few-shot ICL evaluation through lm-evaluation-harness: the `mamba-ft` lm-eval model, the
bundled offline rule tasks, and the Mamba-vs-Transformer sweep.

Importing this package does not import lm-eval; `run_icl_sweep` does, when it runs.
"""

from mamba_ft.evaluation.sweep import (
    DEFAULT_SEEDS,
    DEFAULT_SHOTS,
    IclSweepConfig,
    ModelSpec,
    SweepResult,
    run_after_training,
    run_icl_sweep,
)

__all__ = ["DEFAULT_SEEDS", "DEFAULT_SHOTS", "IclSweepConfig", "ModelSpec", "SweepResult",
           "run_after_training", "run_icl_sweep"]
