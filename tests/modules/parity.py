"""Shared checks of the mixer parity tests: mamba-ft's model against transformers' own on the
same weights. fp32, so only summation order differs: 1e-5 (measured about 1e-7)."""

from __future__ import annotations

import torch

TOL = dict(atol=1e-5, rtol=1e-5)


def assert_grads_match(hf, ft):
    """Every parameter of `ft` has a gradient equal to `hf`'s, parameter for parameter, under
    the same names."""
    for (name, p_hf), (name_ft, p_ft) in zip(hf.named_parameters(), ft.named_parameters()):
        assert name == name_ft
        assert p_ft.grad is not None, name
        torch.testing.assert_close(p_ft.grad, p_hf.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
