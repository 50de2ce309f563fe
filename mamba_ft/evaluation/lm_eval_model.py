"""mamba-ft models inside lm-evaluation-harness: the `mamba-ft` model type.

`MambaFTLM` is lm-eval's Hugging Face wrapper (`HFLM`) around a model that mamba-ft loaded:
any checkpoint `mamba_ft.models.load_model` accepts (Mamba, with mamba-ft's mixers and so the
fused kernels on CUDA, or any transformers causal LM as a baseline), optionally with a
mamba-ft adapter, or a model object already in memory (a training loop's).

What HFLM's scoring gives, and why it is exact here:
- log-likelihood batches are right-padded with no mask; padding after a sequence's last token
  cannot reach its earlier outputs in a causal Transformer or a recurrence, so batch size
  changes nothing beyond float rounding;
- rolling log-likelihood (perplexity tasks) scores disjoint windows, each from a fresh state;
- generation left-pads and passes the attention mask. mamba-ft's mixer zeroes padded positions
  before `in_proj` and after the convolution, so a padded position adds nothing to the conv
  window (its input is 0 when `in_proj` has no bias, as in every released Mamba) and nothing to
  the recurrent state (x = 0 gives B = 0 and the state starts at 0): batched generation is
  exact. A Mamba whose `in_proj` has a bias would leak the bias through the padding into the
  conv window, so for such a model generation runs one request at a time and says so.

Registration makes `simple_evaluate(model="mamba-ft", model_args={...})` work in-process once
this module is imported. lm-eval's own command line has no plugin discovery, so use
`python -m mamba_ft.evaluation` (same arguments as `lm_eval`), which registers the model and
adds the bundled task directory to `--include_path`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mamba_ft.adapters.io import is_adapter_dir
from mamba_ft.errors import UserError
from mamba_ft.models import LoadedModel, load_model, load_tokenizer, mixers, resolve_source

log = logging.getLogger(__name__)

# Mamba checkpoints carry no position limit; the released ones were trained on 2048 tokens.
MAMBA_MAX_LENGTH = 2048


@register_model("mamba-ft")
class MambaFTLM(HFLM):
    """lm-eval model: `pretrained` is a path / hub id / `bundled:NAME`, a LoadedModel or a module.

    `adapter` is a directory written by `mamba_ft.adapters.save_adapters`. With a module,
    pass its `tokenizer` too (an object or a path). Other keyword arguments go to HFLM
    (`max_length`, `mixed_precision_dtype`, `logits_cache`, ...).
    """

    def __init__(self, pretrained=None, adapter: str | None = None, tokenizer=None,
                 device: str | None = None, dtype: str | torch.dtype = "float32",
                 batch_size: int | str = 1, max_length: int | None = None, show_progress: bool = True,
                 **kwargs):
        if pretrained is None:
            raise UserError("The mamba-ft lm-eval model needs pretrained=PATH (a checkpoint "
                            "directory, hub id or bundled:NAME).")
        if adapter is None and is_adapter_dir(pretrained):
            # An adapter directory records its base model, so it alone names a fine-tuned model.
            from mamba_ft.adapters import adapter_base_model

            adapter, pretrained = str(pretrained), adapter_base_model(pretrained)
        self.source = str(pretrained) if isinstance(pretrained, (str, Path)) else type(pretrained).__name__
        self.adapter_dir = None if adapter is None else str(adapter)
        tokenizer_path = tokenizer if isinstance(tokenizer, (str, Path)) else None
        tokenizer = None if tokenizer_path else tokenizer
        if isinstance(pretrained, LoadedModel):
            model, self.source = pretrained.model, pretrained.source
            tokenizer = pretrained.tokenizer if tokenizer is None else tokenizer
        elif isinstance(pretrained, torch.nn.Module):
            model = pretrained
        else:
            loaded = load_model(pretrained, tokenizer=tokenizer_path, allow_transformers=True,
                                dtype=_torch_dtype(dtype))
            model, tokenizer_path = loaded.model, None
            tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None and tokenizer_path:
            tokenizer = load_tokenizer(resolve_source(tokenizer_path), str(tokenizer_path))
        if tokenizer is None:
            raise UserError(f"No tokenizer for {self.source}; pass tokenizer=PATH (or the tokenizer "
                            f"object with an in-memory model).")
        if adapter:
            from mamba_ft.adapters import load_adapters

            load_adapters(model, adapter)
        self.is_mamba = bool(mixers(model))
        self.show_progress = show_progress

        # A model handed over in memory stays where it is unless a device is named.
        if device is None and not isinstance(pretrained, (str, Path)):
            device = str(next(model.parameters()).device)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"Device {device!r} was asked for but CUDA is not available here; use cpu.")
        model.to(torch.device(device))
        super().__init__(
            pretrained=model,
            tokenizer=_with_pad_token(tokenizer),
            backend="causal",
            batch_size=batch_size,
            max_length=max_length or (MAMBA_MAX_LENGTH if self.is_mamba else None),
            **kwargs,
        )

    # The sweep prints one line per evaluation; per-request progress bars would drown it.
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def batched_generation_is_exact(self) -> bool:
        """Whether left padding leaves every real position's numbers unchanged (module docstring)."""
        with torch.no_grad():  # the adapter, if any, builds effective weights: no graph needed
            return all(m.mixer_weights().in_proj_bias is None for m in mixers(self.model))

    def generate_until(self, requests, disable_tqdm: bool = False):
        disable_tqdm = disable_tqdm or not self.show_progress
        if self.batch_size == 1 or self.batched_generation_is_exact():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        log.warning("mamba-ft: this Mamba's in_proj has a bias, which left padding would feed into "
                    "the convolution window; generating one request at a time (batch size 1).")
        saved = self.batch_size_per_gpu
        self.batch_size_per_gpu = 1
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self.batch_size_per_gpu = saved

    def get_model_info(self) -> dict:
        # HFLM's version asks the Hub for a commit hash; a local description is what a results
        # file needs, and it never touches the network.
        return {
            "model_source": self.source,
            "adapter": self.adapter_dir,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "is_mamba": self.is_mamba,
        }


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UserError(f"dtype {dtype!r} is not a floating-point torch dtype; use float32, "
                        f"bfloat16 or float16.")
    return value


def _with_pad_token(tokenizer):
    # HFLM would otherwise add a new "<|pad|>" token the embedding has no row for. Padding is
    # masked (generation) or lies after the scored tokens (log-likelihood), so any existing id
    # serves; copy the tokenizer so the caller's object is left as it was.
    if tokenizer.pad_token_id is not None:
        return tokenizer
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.unk_token_id
    tokenizer = copy.deepcopy(tokenizer)
    if fallback is not None:
        tokenizer.pad_token_id = fallback
    else:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer
