"""The reference scan's extra memory grows with the chunk length, not the sequence length.

Measured, not assumed: a TorchDispatchMode sees every tensor the scan allocates and tracks the
bytes of storages still alive after each op (weak references tell when one is freed), giving
the peak of live memory the scan added on top of its inputs. (Resident-set size would measure
the C allocator's caching instead.) A scan that built the (batch, d, L, N) tensor, as
transformers' pure-PyTorch path does, would need 4 * d * L * N bytes for it alone.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mamba_ft.ops import reference

D, N = 32, 64


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_extra_bytes(length: int, chunk: int, grad: bool) -> int:
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, D, length, generator=g) for _ in range(3))
    B, C = (torch.randn(1, N, length, generator=g) for _ in range(2))
    A = -torch.rand(D, N, generator=g)
    inputs = [u, delta, A, B, C, z]
    if grad:
        for t in inputs:
            t.requires_grad_()
    with LiveBytes() as meter:
        y = reference.selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, chunk_size=chunk)
        if grad:
            y.sum().backward()
    return meter.peak


def test_extra_memory_follows_chunk_not_length():
    per_position = 4 * D  # one (1, d) fp32 column of an activation or gradient
    full_state_bytes = 4 * D * N  # what a materialising scan stores per position
    short, long = peak_extra_bytes(256, 16, grad=True), peak_extra_bytes(1024, 16, grad=True)
    growth_per_position = (long - short) / (1024 - 256)
    # Growth with L is that of (d, L) activations and gradients (~a dozen of them) plus one
    # (d, N) state per 16-step chunk (N/16 of a column per position): well under the N columns
    # per position a materialised (d, L, N) tensor costs (N = 64 here).
    assert growth_per_position < full_state_bytes / 2, (short, long)
    assert growth_per_position < 20 * per_position, (short, long)
    # The working set follows the chunk: 256-step chunks hold (256, d, N) tensors, 16-step
    # chunks (16, d, N) ones.
    small, big = peak_extra_bytes(1024, 16, grad=False), peak_extra_bytes(1024, 256, grad=False)
    assert big - small > 2 * (256 - 16) * full_state_bytes, (small, big)
