"""`mamba-ft generate`: text from a model or a fine-tuned adapter, streamed.

Pure Mamba models decode with `mamba_ft.decoding.Decoder`, whose one-token step is replayed as
a CUDA graph on a GPU (`--eager` runs it step by step); hybrids, and models whose generation
config asks for more than sampling, through transformers' `generate`. Both give the tokens
`generate` gives. An adapter is folded into the base weights in fp32 before they are cast to
`--dtype`, so each token reads each weight once.

Every option is checked before the model loads, and an option that would have no effect (a
sampling knob without --sample) is an error rather than ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mamba_ft.decoding import Decoder, token_chooser, why_generate_decodes
from mamba_ft.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy unless `sample`; the knobs apply only when sampling."""

    max_new_tokens: int = 128
    sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens}).")
        knobs = {"--temperature": self.temperature, "--top-p": self.top_p, "--top-k": self.top_k}
        if not self.sample:
            given = [name for name, value in knobs.items() if value is not None]
            if given:
                raise UserError(f"{', '.join(given)} only apply when sampling; add --sample, or "
                                f"drop them for greedy decoding.")
            return
        if self.temperature is not None and not self.temperature > 0:
            raise UserError(f"--temperature must be above 0 (got {self.temperature}); use greedy "
                            f"decoding (no --sample) for the most likely tokens.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1 (got {self.top_k}).")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample}
        if self.sample:
            kwargs.update({key: value for key, value in (("temperature", self.temperature),
                                                         ("top_p", self.top_p), ("top_k", self.top_k))
                           if value is not None})
        return kwargs


def load_for_generation(source: str, adapter: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | None = None):
    """(model, tokenizer): `source` a model, or an adapter directory (its base recorded in it)."""
    from mamba_ft.adapters import adapter_base_model, load_adapters
    from mamba_ft.adapters.io import is_adapter_dir
    from mamba_ft.models import load_model

    if adapter is None and is_adapter_dir(source):
        adapter, source = source, adapter_base_model(source)
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"The adapter directory {adapter!r} does not exist; give the directory a "
                        f"training run saved its adapter to (OUTPUT_DIR/adapter).")
    from mamba_ft.adapters import merge_adapters

    loaded = load_model(source, allow_transformers=True,
                        dtype=torch.float32 if adapter is not None else dtype)
    model = loaded.model
    if adapter is not None:
        load_adapters(model, adapter)
        model = merge_adapters(model).to(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), loaded.tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, sampling: Sampling, stream: bool = False,
             cuda_graph: bool = True) -> str:
    """The text generated after `prompt` (the prompt itself not included). `cuda_graph`:
    replay a pure Mamba model's one-token step as a CUDA graph when it is on a GPU."""
    if not prompt.strip():
        raise UserError("The prompt is empty; give --prompt TEXT or a --prompt-file with text in it.")
    sampling.check()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_because = why_generate_decodes(model)
    if generate_because is None:
        decoder = Decoder(model, cuda_graph=cuda_graph and device.type == "cuda")
        choose = token_chooser(model, sampling.sample, sampling.temperature, sampling.top_k,
                               sampling.top_p)
        out = decoder.generate(inputs["input_ids"], sampling.max_new_tokens, choose,
                               attention_mask=inputs.get("attention_mask"),
                               eos_token_id=model.generation_config.eos_token_id,
                               pad_token_id=pad, streamer=streamer)
    else:
        if cuda_graph and device.type == "cuda":  # where the graphed decoder would have run
            print(f"Decoding step by step with transformers' generate, not as a CUDA graph: "
                  f"{generate_because}.", file=sys.stderr)
        out = model.generate(**inputs, **sampling.generate_kwargs(), pad_token_id=pad,
                             streamer=streamer)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main_from_cli(args) -> str:
    """The `mamba-ft generate` command (arguments parsed in mamba_ft.cli)."""
    sampling = Sampling(max_new_tokens=args.max_new_tokens, sample=args.sample,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        seed=args.seed)
    sampling.check()
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("Give the prompt once: --prompt TEXT or --prompt-file FILE.")
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text()
        except OSError as exc:
            raise UserError(f"Could not read --prompt-file {args.prompt_file}: {exc.strerror}.") from None
    if not prompt.strip():
        raise UserError("The prompt is empty; give --prompt TEXT or a --prompt-file with text in it.")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tokenizer = load_for_generation(args.model, args.adapter, dtype, args.device)
    text = generate(model, tokenizer, prompt, sampling, stream=not args.no_stream,
                    cuda_graph=not args.eager)
    if args.no_stream:
        print(text)
    return text
