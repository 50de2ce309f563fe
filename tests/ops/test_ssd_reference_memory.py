"""The SSD reference's extra memory grows with the chunk length, not the sequence length.

Measured with the same live-storage meter as the Mamba-1 reference's test
(tests/ops/test_reference_memory.py): the peak bytes of tensor storages the scan created and
still holds. A scan that kept every position's state for the backward (per-step autograd on
the recurrence) would hold heads * head_dim * N fp32 values per position; the chunked
Function keeps one state per chunk and recomputes the rest.
"""

from __future__ import annotations

import torch
from test_reference_memory import LiveBytes

from mamba_ft.ops.ssd_reference import mamba_chunk_scan_combined

HEADS, HEAD_DIM, N = 4, 16, 64


def peak_extra_bytes(length: int, chunk: int, grad: bool) -> int:
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(1, length, HEADS, HEAD_DIM, generator=g) for _ in range(2))
    dt = torch.randn(1, length, HEADS, generator=g)
    B, C = (torch.randn(1, length, 1, N, generator=g) for _ in range(2))
    A, D, dt_bias = -torch.rand(HEADS, generator=g), torch.randn(HEADS), torch.randn(HEADS)
    inputs = [x, dt, A, B, C, D, z, dt_bias]
    if grad:
        for t in inputs:
            t.requires_grad_()
    with LiveBytes() as meter:
        y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D, z, dt_bias, dt_softplus=True)
        if grad:
            y.sum().backward()
    return meter.peak


def test_extra_memory_follows_chunk_not_length():
    per_position = 4 * HEADS * HEAD_DIM  # one position of x (or z, or their gradients), fp32
    state_bytes = 4 * HEADS * HEAD_DIM * N  # what keeping every position's state costs
    short, long = peak_extra_bytes(256, 16, grad=True), peak_extra_bytes(1024, 16, grad=True)
    growth_per_position = (long - short) / (1024 - 256)
    # Growth with L is that of (L, heads, head_dim)-sized activations and gradients (about a
    # dozen) plus one state per 16-step chunk (1/16 of a state per position): well under the
    # full state per position a per-step graph keeps (16 KiB here).
    assert growth_per_position < state_bytes / 2, (short, long)
    assert growth_per_position < 24 * per_position, (short, long)
    # The working set follows the chunk: 256-step chunks hold at least one (heads, 256, 256)
    # fp32 matrix at a time, 16-step chunks (heads, 16, 16) ones.
    small, big = peak_extra_bytes(1024, 16, grad=False), peak_extra_bytes(1024, 256, grad=False)
    assert big - small > 4 * HEADS * (256 * 256 - 16 * 16), (small, big)
