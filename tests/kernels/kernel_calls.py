"""Counting calls into `mamba_ft.kernels`: a test that compares the kernels with the reference
must also see that the kernels ran (a dispatch that fell back to the reference would compare
the reference with itself)."""

from __future__ import annotations


def count_kernel_calls(monkeypatch, *names: str) -> dict[str, int]:
    """Wrap each named entry point of `mamba_ft.kernels` for the test's duration; the returned
    dict holds how many times each was called."""
    from mamba_ft import kernels

    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(kernels, name)

        def counting(*args, _name=name, _fn=original, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counting)
    return calls
