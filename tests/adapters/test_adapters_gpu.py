"""Adapters on the fused GPU path: the same model on CUDA (mamba-ft's Triton kernels when
available) and on CPU (reference ops) gives the same logits and adapter gradients.

Run on a GPU machine: `pytest -m gpu tests/adapters`. Tolerance: fp32, TF32 off; the kernels sum
in another order than the chunked reference, so 1e-4 relative to each tensor's largest entry.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_models import ft_copy, plain_mamba, randomize_adapters

from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters, check_adapter_gradients

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_path_reads_the_adapted_weights(ids, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = ft_copy(plain_mamba())
    attach_adapters(cpu, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=3))
    randomize_adapters(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    results = {}
    for name, model, x in (("cpu", cpu, ids), ("gpu", gpu, ids.cuda())):
        out = model(x, labels=x)
        out.loss.backward()
        check_adapter_gradients(model)
        results[name] = (out.logits.detach().cpu(),
                         {n: p.grad.detach().cpu() for n, p in adapter_parameters(model).items()})
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = results["cpu"], results["gpu"]
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-4 * cpu_logits.abs().max().item())
    assert cpu_grads.keys() == gpu_grads.keys()
    for name, expected in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], expected, rtol=1e-3,
                                   atol=1e-4 * expected.abs().max().item(), msg=name)
