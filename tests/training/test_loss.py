"""The chunked next-token loss against F.cross_entropy on the fp32 copy of the shifted logits.

fp32 logits: the same fp32 operations summed in another order, so the loss agrees to 1e-6
relative and the gradient to 1e-6. bf16 logits: both upcast the same bf16 values and the
gradient ends in bf16 either way (autograd casts the fp32 gradient back through `.float()`),
so they agree within one bf16 rounding (rtol 1e-2, atol 1e-6 for the near-zero entries).
"""

import pytest
import torch
import torch.nn.functional as F

import mamba_ft.training.loss as loss_mod

IGNORE = -100


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def _case(batch, L, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, L, vocab, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, L), generator=g)
    labels[torch.rand(batch, L, generator=g) < 0.3] = IGNORE  # prompts and padding
    labels[0] = IGNORE  # a row with no target at all
    return logits, labels


@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, dict(rtol=1e-6, atol=1e-6)),
    (torch.bfloat16, dict(rtol=1e-2, atol=1e-6)),
])
@pytest.mark.parametrize("chunk_elements", [loss_mod._CHUNK_ELEMENTS, 7 * 33])  # one / many chunks
def test_loss_and_gradient_match_cross_entropy(dtype, tol, chunk_elements, monkeypatch):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", chunk_elements)  # 7 rows of 33 per chunk
    logits, labels = _case(3, 17, 33, dtype)
    got = loss_mod.next_token_loss_sum(logits, labels, IGNORE)
    want = reference(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (g_got,) = torch.autograd.grad(got * 0.7, logits)
    (g_want,) = torch.autograd.grad(want * 0.7, logits)
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.float(), g_want.float(), **tol)
    assert g_got[0].abs().max() == 0  # no target in row 0: no gradient
    assert g_got[:, -1].abs().max() == 0  # the last position predicts nothing


def test_all_ignored_batch_gives_zero_loss_and_gradient():
    logits, labels = _case(2, 5, 11, torch.float32)
    labels[:] = IGNORE
    loss = loss_mod.next_token_loss_sum(logits, labels, IGNORE)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, logits)
    assert g.abs().max() == 0
