"""Whole mixers through the Triton kernels against the same mixers on the reference ops.

The kernel tests check each kernel on tensors laid out as the test makes them; this checks the
kernels as the mixers call them: the layouts and strides the mixers hand over (Mamba-2's conv
reading a transposed channel slice of in_proj's rows, x / B / C as views of the conv's output),
packed documents, and adapters on every target. A tiny Mamba and a tiny Mamba-2 (two B/C
groups, several chunks and a partial one) run one forward and backward with
`MAMBA_FT_OPS=kernels` and with `MAMBA_FT_OPS=reference`, in fp32: the loss and every
trainable parameter's gradient must agree within rtol 1e-4 / atol 1e-6 (summation order only:
on the CPU the interpreter's dots are IEEE fp32).

On the CPU this runs under Triton's interpreter (kernel_interpreter.py), on a GPU compiled.
"""

from __future__ import annotations

import pytest
import torch
from kernel_calls import count_kernel_calls
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter

CONFIGS = {
    "mamba": dict(model_type="mamba", vocab_size=64, hidden_size=16, state_size=4,
                  num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4, use_cache=False),
    "mamba2": dict(model_type="mamba2", vocab_size=64, hidden_size=32, num_heads=4, head_dim=16,
                   n_groups=2, state_size=16, chunk_size=16, num_hidden_layers=2, expand=2,
                   conv_kernel=4, use_cache=False),
}
KERNELS = {"mamba": ("selective_scan_fn", "causal_conv1d_fn"),
           "mamba2": ("mamba_chunk_scan_combined", "causal_conv1d_fn", "gated_rms_norm_fn")}


def loss_and_grads(model_type, mode, monkeypatch):
    from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters
    from mamba_ft.models import document_starts, load_model

    monkeypatch.setenv("MAMBA_FT_OPS", mode)
    calls = count_kernel_calls(monkeypatch, *KERNELS[model_type])
    model = load_model(CONFIGS[model_type], need_tokenizer=False, seed=0).model.to(DEVICE).train()
    attach_adapters(model, AdapterConfig(targets=["all"], rank=2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero LoRA B matrices, so every adapter matrix gets a gradient
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, 64, (2, 24), generator=gen).to(DEVICE)
    starts = torch.zeros(2, 24, dtype=torch.bool, device=DEVICE)
    starts[:, [0, 7, 19]] = True  # packed documents: starts in the first and the partial chunk
    with document_starts(model, starts):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@in_process
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_mixer_through_the_kernels_equals_the_reference(model_type, monkeypatch):
    loss_k, grads_k, calls_k = loss_and_grads(model_type, "kernels", monkeypatch)
    loss_r, grads_r, calls_r = loss_and_grads(model_type, "reference", monkeypatch)
    layers = CONFIGS[model_type]["num_hidden_layers"]
    assert calls_k == dict.fromkeys(KERNELS[model_type], layers)  # one call each per layer
    assert not any(calls_r.values())
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=0)
    assert grads_k.keys() == grads_r.keys()
    for name, g in grads_k.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_r[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_kernels_mode_needs_the_interpreter_on_the_cpu(monkeypatch):
    from mamba_ft.ops.dispatch import use_fused

    monkeypatch.setenv("MAMBA_FT_OPS", "kernel")
    with pytest.raises(ValueError, match="not one of auto, reference, kernels"):
        use_fused(torch.zeros(1))
    monkeypatch.setenv("MAMBA_FT_OPS", "kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_fused(torch.zeros(1))


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_kernels_under_interpreter_subprocess():
    run_file_under_interpreter(__file__)
