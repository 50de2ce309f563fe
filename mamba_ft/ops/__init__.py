"""The mixers' numerical ops: what they compute (`reference` for Mamba-1, `ssd_reference` for
Mamba-2's SSD), how the projections feed the kernels' layout (`projections`), and which
implementation runs where (`dispatch`).

Modules call these names only; `dispatch` picks the Triton kernels (`mamba_ft.kernels`) for
CUDA tensors and the reference elsewhere.
"""

from mamba_ft.ops.dispatch import (causal_conv1d, causal_conv1d_step, gated_rms_norm,
                                   mamba_chunk_scan_combined, rms_norm, selective_scan,
                                   selective_state_step, ssd_state_step, use_fused)

__all__ = ["causal_conv1d", "causal_conv1d_step", "gated_rms_norm", "mamba_chunk_scan_combined",
           "rms_norm", "selective_scan", "selective_state_step", "ssd_state_step", "use_fused"]
