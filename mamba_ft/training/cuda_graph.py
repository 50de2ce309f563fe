"""A training micro-step (forward, loss, backward) captured once as a CUDA graph and replayed.

At small batches a Mamba training step is bound by the host, not the GPU: Mamba-1.4B with
LoRA at batch 2 issues about 5,000 kernel launches and autograd nodes per step, and Python
cannot issue them as fast as the GPU runs them (docs/benchmarks.md: 186 ms of kernels, 250 to
310 ms of wall time). A CUDA graph records those launches once; each later step is one
`replay()`, so the step costs its kernels' time.

What replay requires, and how it is met here:
- Fixed shapes and addresses. The batch is copied into tensors owned by the graph (the
  training loop pads every micro-batch to `data.max_length`), and so is the loss scale,
  which changes from step to step.
- Gradients that accumulate in place. Each trainable parameter the backward reaches has a
  `.grad` before capture (made by the warm-up), so the captured backward adds into it
  (`grad += g`) instead of allocating it; the optimizer must zero gradients in place
  (`zero_grad(set_to_none=False)`), never drop them.
- No host synchronisation inside the step (no `.item()`, no data-dependent Python branches).
  mamba-ft's forward, kernels and loss have none; the optimizer step, clipping and logging
  run outside the graph, eagerly.
- Kernels compiled before capture: a few eager warm-up runs on a side stream, with the loss
  scale 0 and the gradients put back afterwards, so they change nothing.
Random numbers (adapter dropout) are drawn afresh at each replay: PyTorch's CUDA generator
advances its offset per replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mamba_ft.errors import UserError

_WARMUP_RUNS = 3  # PyTorch's documentation warms up a few iterations before capture


class GraphedMicroStep:
    """`micro_step(batch, scale)` (forward + loss + `(loss * scale).backward()`), replayed.

    `micro_step` takes a dict of device tensors and a 0-d fp32 device tensor, and returns the
    (unscaled) loss; `params` are the tensors whose gradients it accumulates. The graph is
    captured at the first call, on that batch's shapes; every later batch must have the same
    keys, shapes and dtypes.
    """

    def __init__(self, micro_step: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                 params: Sequence[torch.Tensor], device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.micro_step, self.params, self.device = micro_step, list(params), device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: dict[str, torch.Tensor] = {}
        self.static_scale = torch.zeros((), dtype=torch.float32, device=device)
        self.static_loss: torch.Tensor | None = None

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Run one micro-step on `batch`, backward scaled by `scale`; returns the loss (a copy)."""
        if self.graph is None:
            self._capture(batch)
        else:
            self._check_same_layout(batch)
        for key, value in batch.items():
            self.static_batch[key].copy_(value, non_blocking=True)
        self.static_scale.fill_(scale)
        self.graph.replay()
        return self.static_loss.clone()

    def _check_same_layout(self, batch: dict[str, torch.Tensor]) -> None:
        layout = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
        captured = {k: (tuple(v.shape), v.dtype) for k, v in self.static_batch.items()}
        if layout != captured:
            raise ValueError(f"A CUDA-graphed micro-step replays fixed shapes: captured {captured}, "
                             f"got {layout}. Pad every micro-batch to the same length.")

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        self.static_batch = {k: v.to(self.device, copy=True) for k, v in batch.items()}
        # Gradients the caller already holds (an accumulation in progress) are kept aside and
        # put back after the warm-up.
        held = [None if p.grad is None else p.grad.clone() for p in self.params]
        # Warm up on a side stream (compiles the Triton kernels, lets autograd and cuBLAS set up
        # their workspaces) with the loss scale 0. The warm-up's backward also creates the
        # .grad tensors the graph will accumulate into.
        self.static_scale.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                self.micro_step(self.static_batch, self.static_scale)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for p, g in zip(self.params, held):
                # A parameter the backward never reaches keeps .grad None, so a check for
                # unreached adapters (mamba_ft.adapters.check_adapter_gradients) still sees it.
                if g is not None:
                    p.grad.copy_(g)
                elif p.grad is not None:
                    p.grad.zero_()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_loss = self.micro_step(self.static_batch, self.static_scale).detach()
        except RuntimeError as exc:  # e.g. a model whose forward synchronises with the host
            self.graph = None
            raise UserError(f"The training micro-step could not be captured as a CUDA graph "
                            f"({str(exc).splitlines()[0]}); this model's forward or backward waits "
                            f"on the host somewhere. Set run.cuda_graphs: false.") from exc
