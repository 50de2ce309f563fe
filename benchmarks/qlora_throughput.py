"""QLoRA training throughput and memory on a CUDA GPU: bf16-frozen LoRA against nf4 and int8 bases.

Models are built from configs (random init, no downloads) in the shapes of Mamba-1.4B (d_model
2048, 48 layers) and Mamba-2.8B (d_model 2560, 64 layers): vocab 50280, state 16, expand 2,
conv 4. One step is the training loop's own micro-step (`forward_loss_sum`: bf16 autocast under
an `Accelerator(mixed_precision="bf16")`, the fp32 chunked next-token loss, backward) and a fused
AdamW step, at L 2048 on random token ids, LoRA rank 8 on every target
(`AdapterConfig(targets=["all"], rank=8)`), through the fused kernels.

Bases (each with each --recompute setting: none, `set_recompute_ssm`, or whole blocks
checkpointed as `model.checkpoint_blocks` does; default none and ssm; at every --batch):
- bf16-frozen: the frozen base stored in bf16 (`precision.frozen_base: bf16`);
- nf4: the mixers' in_proj / out_proj quantised to nf4 (double quantisation, compute dtype
  bf16; `QuantizeConfig(kind="nf4")`), the rest of the frozen base in bf16;
- nf4-embeddings: the same, and the input embedding (vocab x d_model) in nf4 too, which the
  tied lm_head reads (`QuantizeConfig(kind="nf4", modules=["in_proj", "out_proj",
  "embeddings"])`; docs/quantization.md): the embeddings are the largest bf16 tensor left;
- int8: the same modules as nf4 in bitsandbytes' row-wise int8, the rest in bf16.
The model is built the way the training loop builds it (models/quantize.py, training/setup.py):
quantise, recompute, attach adapters, then `PrecisionPolicy(mode="bf16", frozen_base="bf16")`
(recurrence parameters, norms and adapters fp32, every other frozen weight bf16). To stay
frugal, each shape's model is built once (random init on the GPU, which is fast, then cast) and
kept on the CPU with its frozen-to-be weights in bf16; each row copies it, moves the copy to the
GPU in bf16 and quantises it there (`quantize_model` quantises on the weights' device), and
frees it (gc, empty_cache) before the next row.

Per row: tokens/s, peak GiB of the training steps (the peak counter is reset once the model is
built; `resident GiB` is what the built model holds before the first step), the base weights'
bytes (every base parameter and buffer; a quantised matrix counted by its real storage,
bitsandbytes' packed data plus its quantisation state; `mamba_ft.models.quantize.
base_weight_bytes`) and their ratio to the bf16 base's, the same for the quantised modules
alone (the embeddings among them for nf4-embeddings), and the trainable parameters.

Comparison (1.4B shape only, --no-baseline to skip): transformers + PEFT + bitsandbytes QLoRA.
The same random-init weights are saved to a temporary directory and loaded by transformers'
MambaForCausalLM with `BitsAndBytesConfig(load_in_4bit=True, nf4, double quantisation, compute
dtype bf16)`, then `peft.prepare_model_for_kbit_training` (the usual QLoRA recipe: the weights
left unquantised go to fp32), LoRA rank 8 on in_proj and x_proj (`peft.get_peft_model`), the
model's own loss (`model(input_ids, labels=input_ids).loss`, the mean over targets) under the
same Accelerator's autocast, fused AdamW. Three variants: transformers' default quantisation
(every Linear but the head: in_proj, x_proj, dt_proj, out_proj; its Mamba forward reads
`dt_proj.weight` as a matrix, which a Linear4bit's packed weight is not) with PEFT's gradient
checkpointing; in_proj and out_proj alone quantised (`llm_int8_skip_modules`: the modules
mamba-ft quantises) with and without gradient checkpointing. Without the mamba_ssm kernels
transformers runs Mamba's pure-PyTorch scan (a Python loop over the L positions, several
(batch, d_inner, L, state) fp32 tensors per layer), so it gets fewer steps (--baseline-steps).
A failure (OOM, unsupported) is recorded as its error.

    python benchmarks/qlora_throughput.py [--only 1.4b|2.8b] [--batch 2 1] [--no-baseline] [--out DIR]
    python benchmarks/qlora_throughput.py --cpu-dry-run --out /tmp/qlora_dry   # tiny, on the CPU

Writes qlora_throughput.json and qlora_throughput.md under --out (rewritten after every row, so
a run cut short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mamba_ft.models import load_model, set_recompute_ssm
from mamba_ft.models.quantize import QuantizeConfig, base_weight_bytes, quantize_model
from mamba_ft.precision import FP32_PARAMS, PrecisionPolicy
from mamba_ft.training.step import forward_loss_sum

from bench_common import (RESULTS_DIR, device_and_versions, markdown_table, utc_minute,
                          wall_seconds_per_call, write_json, write_markdown)

VOCAB = 50280
MODELS = {
    "1.4b": dict(hidden_size=2048, num_hidden_layers=48, vocab_size=VOCAB),
    "2.8b": dict(hidden_size=2560, num_hidden_layers=64, vocab_size=VOCAB),
    # --cpu-dry-run only: the same code end to end on a shape the CPU runs in seconds.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024),
}
# Each quantised base's model.quantize (compute dtype bf16, as precision.mode bf16 resolves it).
QUANTIZED_BASES = {
    "nf4": dict(kind="nf4"),
    "nf4-embeddings": dict(kind="nf4", modules=["in_proj", "out_proj", "embeddings"]),
    "int8": dict(kind="int8"),
}
BASES = ["bf16-frozen", *QUANTIZED_BASES]
BASELINE = "hf+peft nf4"
NAME = "qlora_throughput"


def config_of(name: str) -> dict:
    shape = MODELS[name]
    return dict(model_type="mamba", vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                num_hidden_layers=shape["num_hidden_layers"], state_size=16, expand=2, conv_kernel=4,
                use_cache=False)


def build_master(name: str, device: torch.device) -> torch.nn.Module:
    """The shape's random-init model (mamba-ft's mixers) on the CPU, its frozen-to-be weights in
    bf16: what every row of this shape copies. The recurrence parameters and norms stay fp32
    (`precision.FP32_PARAMS`), as the precision policy keeps them.

    Built (random init included) on `device` when that is a GPU, which takes seconds where the
    CPU takes a minute for 2.8B; then kept on the CPU, off the GPU's peak."""
    try:
        with device:
            model = load_model(config_of(name), need_tokenizer=False, seed=0).model
    except Exception as exc:
        if not _is_cuda(device):
            raise
        print(f"building {name} on {device} failed ({error_text(exc)}); building it on the CPU",
              flush=True)
        model = load_model(config_of(name), need_tokenizer=False, seed=0).model
    for pname, param in model.named_parameters():
        if param.is_floating_point() and not FP32_PARAMS.search(pname):
            param.data = param.data.to(torch.bfloat16)
    return model.cpu()


# --- device helpers ---------------------------------------------------------------------------

def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def free(device: torch.device) -> None:
    """Drop what the previous row left (adapter hooks can keep a model alive in a cycle) and
    restart the peak counter."""
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_gib(device: torch.device, peak: bool) -> float | None:
    if not _is_cuda(device):
        return None  # no allocator statistics on the CPU
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if _is_cuda(device) else (lambda: None)


_ACCELERATOR = None


def bf16_accelerator():
    """One Accelerator for the process (its state is process-wide), as the loop builds it."""
    from accelerate import Accelerator

    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(mixed_precision="bf16")
    return _ACCELERATOR


def error_text(exc: BaseException) -> str:
    """One line: OOM, or the exception's type and first line, and where it was raised outside
    torch and bitsandbytes (file:line and the line's code), so a table says what failed."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not any(part in f.filename for part in ("/torch/", "/bitsandbytes/", "qlora_throughput"))]
    if frames:
        f = frames[-1]
        line += f" (at {Path(f.filename).name}:{f.lineno}: {(f.line or '').strip()[:120]})"
    return line


# --- mamba-ft rows ----------------------------------------------------------------------------

# What the backward recomputes: nothing, each mixer's SSM branch (model.recompute_ssm), or
# each whole block (model.checkpoint_blocks); the table's "options" column.
RECOMPUTE_OPTIONS = {"none": "", "ssm": "recompute", "blocks": "checkpoint blocks"}


def build_row_model(master, base: str, recompute: str, device: torch.device):
    """A copy of `master` on `device`, quantised as `base` says, adapters attached, the bf16
    precision policy applied (training/setup.py's order). Returns (model, facts)."""
    from mamba_ft.adapters import AdapterConfig, attach_adapters

    model = copy.deepcopy(master).to(device)
    facts = {}
    if base != "bf16-frozen":
        report = quantize_model(model, QuantizeConfig(**QUANTIZED_BASES[base], compute_dtype="bfloat16"))
        facts["quantized_modules"] = sorted(report.rows)
        facts["quantized_params"] = sum(r[1] for r in report.rows.values())
        facts["quantized_bf16_bytes"] = sum(r[2] for r in report.rows.values())
        facts["quantized_bytes"] = sum(r[3] for r in report.rows.values())
        facts["double_quant"] = report.double_quant
    # Counted before the adapters exist: the base alone (bitsandbytes' statistics included).
    facts["base_bytes"] = base_weight_bytes(model)
    if recompute == "ssm":
        set_recompute_ssm(model, True)
    elif recompute == "blocks":  # the recipe's model.checkpoint_blocks (training/setup.py)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    attach_adapters(model, AdapterConfig(targets=["all"], rank=8))
    PrecisionPolicy(mode="bf16", frozen_base="bf16").apply(model)
    model.train()
    return model, facts


def make_step(model, batch: int, L: int, vocab: int, device: torch.device, opt, losses: list):
    """One training step of the loop's micro-step + the optimizer, on fixed random ids."""
    ids = torch.randint(0, vocab, (batch, L), device=device)
    n_targets = ids.numel() - ids.shape[0]
    accelerator = bf16_accelerator()

    def step():
        loss_sum = forward_loss_sum(model, {"input_ids": ids, "labels": ids}, accelerator,
                                    backward_scale=1.0 / n_targets)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / n_targets)

    return step


def timed_batches(model, run_batches, L, vocab, device, steps, warmup, base_row, opt):
    """Rows for each batch of `run_batches` on one built model (the optimizer's state is made
    at the first step and kept)."""
    rows = []
    for batch in run_batches:
        row = dict(base_row, batch=batch)
        losses: list[float] = []
        free(device)
        try:
            step = make_step(model, batch, L, vocab, device, opt, losses)
            secs = wall_seconds_per_call(step, steps, warmup, synchronize=synchronizer(device))
            row.update(step_s=secs, tokens_per_s=batch * L / secs,
                       peak_GiB=allocated_gib(device, peak=True), last_loss=losses[-1])
        except Exception as exc:  # OOM or unsupported: record it and go on
            row["error"] = error_text(exc)
        opt.zero_grad(set_to_none=True)
        rows.append(row)
        print(row, flush=True)
    return rows


def run_mamba_ft(name, master, base, recompute, batches, args, device, bf16_bytes):
    t0 = time.perf_counter()
    head = dict(model=name, base=base, options=RECOMPUTE_OPTIONS[recompute],
                recompute=recompute, L=args.L, steps=args.steps,
                warmup=args.warmup, base_bf16_bytes=bf16_bytes)
    free(device)
    try:
        model, facts = build_row_model(master, base, recompute, device)
    except Exception as exc:
        row = dict(head, error=f"build: {error_text(exc)}")
        print(row, flush=True)
        return [dict(row, batch=b) for b in batches]
    head.update(facts, base_ratio=facts["base_bytes"] / bf16_bytes,
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                resident_GiB=allocated_gib(device, peak=False),
                build_s=time.perf_counter() - t0)
    if "quantized_bytes" in facts:
        head["quantized_ratio"] = facts["quantized_bytes"] / facts["quantized_bf16_bytes"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)
    rows = timed_batches(model, batches, args.L, MODELS[name]["vocab_size"], device, args.steps,
                         args.warmup, head, opt)
    for row in rows:
        row["row_s"] = time.perf_counter() - t0
    del model, opt
    return rows


# --- transformers + PEFT + bitsandbytes ------------------------------------------------------

# (options label, modules transformers keeps unquantised, PEFT gradient checkpointing)
BASELINE_VARIANTS = [
    # transformers' default: every Linear but the head (in_proj, x_proj, dt_proj, out_proj).
    ("all Linears 4-bit, grad. ckpt", None, True),
    # The modules mamba-ft quantises (in_proj, out_proj), x_proj and dt_proj left in bf16 (then fp32).
    ("in/out_proj 4-bit, grad. ckpt", ["lm_head", "x_proj", "dt_proj"], True),
    ("in/out_proj 4-bit", ["lm_head", "x_proj", "dt_proj"], False),
]


def save_checkpoint(master, directory: str) -> str | None:
    """The shape's random-init weights as a plain transformers checkpoint (the swapped mixers
    keep transformers' parameter names); None, or the error."""
    try:
        master.save_pretrained(directory)
    except Exception as exc:
        return f"save: {error_text(exc)}"
    return None


def run_baselines(name, checkpoint, batches, args, device, bf16_bytes, on_rows):
    """transformers' MambaForCausalLM loaded 4-bit by its own bitsandbytes integration from
    `checkpoint`, PEFT LoRA on in_proj and x_proj, the model's own loss; `on_rows` gets each
    variant's rows (one per batch)."""
    for options, skip, checkpointing in BASELINE_VARIANTS:
        variant_rows = run_baseline(name, checkpoint, batches, args, device, bf16_bytes, options,
                                    skip, checkpointing)
        free(device)
        on_rows(variant_rows)


def hf_step(model, opt, ids, accelerator, losses):
    def step():
        with accelerator.autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def run_baseline(name, checkpoint, batches, args, device, bf16_bytes, options, skip, checkpointing):
    t0 = time.perf_counter()
    head = dict(model=name, base=BASELINE, options=options, recompute="none", L=args.L,
                steps=args.baseline_steps, warmup=1, base_bf16_bytes=bf16_bytes,
                hf_skip_modules=skip, gradient_checkpointing=checkpointing,
                loss="transformers' own (mean CE over shifted labels)",
                lora_targets=["in_proj", "x_proj"])
    free(device)
    rows = []
    try:
        import peft
        from transformers import BitsAndBytesConfig, MambaForCausalLM

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                llm_int8_skip_modules=skip)
        model = MambaForCausalLM.from_pretrained(
            checkpoint, quantization_config=qc, dtype=torch.bfloat16,
            device_map={"": device.index or 0} if _is_cuda(device) else {"": "cpu"})
        from transformers.models.mamba import modeling_mamba

        head["hf_fast_path"] = bool(getattr(modeling_mamba, "is_fast_path_available", False))
        head["quantized_modules"] = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                            if type(m).__name__ in ("Linear4bit", "Linear8bitLt")})
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        head["base_bytes"] = base_weight_bytes(model)  # after prepare_: its fp32 casts included
        head["base_ratio"] = head["base_bytes"] / bf16_bytes
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["in_proj", "x_proj"],
            task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        head.update(trainable=sum(p.numel() for p in params), resident_GiB=allocated_gib(device, peak=False),
                    build_s=time.perf_counter() - t0)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    except Exception as exc:
        row = dict(head, error=f"build: {error_text(exc)}")
        print(row, flush=True)
        return [dict(row, batch=b) for b in batches]
    accelerator = bf16_accelerator()
    vocab = MODELS[name]["vocab_size"]
    for batch in batches:
        row = dict(head, batch=batch)
        losses: list[float] = []
        free(device)
        try:
            ids = torch.randint(0, vocab, (batch, args.L), device=device)
            step = hf_step(model, opt, ids, accelerator, losses)
            secs = wall_seconds_per_call(step, args.baseline_steps, 1, synchronize=synchronizer(device))
            row.update(step_s=secs, tokens_per_s=batch * args.L / secs,
                       peak_GiB=allocated_gib(device, peak=True), last_loss=losses[-1])
        except Exception as exc:
            row["error"] = error_text(exc)
        opt.zero_grad(set_to_none=True)
        row["row_s"] = time.perf_counter() - t0
        rows.append(row)
        print(row, flush=True)
    del model, opt
    return rows


# --- output ---------------------------------------------------------------------------------------

def run_info(device: torch.device, dry_run: bool) -> dict:
    import accelerate
    import transformers

    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    name = (torch.cuda.get_device_name() if _is_cuda(device)
            else f"CPU ({platform.processor() or platform.machine()}), dry run")
    return dict(date=utc_minute(), device=name, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, bitsandbytes=bnb_version, transformers=transformers.__version__,
                peft=peft_version, accelerate=accelerate.__version__,
                mamba_ft_ops=os.environ.get("MAMBA_FT_OPS", "auto"), dry_run=dry_run)


def _fmt(value, spec, suffix=""):
    return "" if value is None else f"{value:{spec}}{suffix}"


def table_lines(info: dict, rows: list[dict], args) -> list[str]:
    # tokens/s against the bf16-frozen row of the same model, batch and recompute setting.
    ref = {(r["model"], r["batch"], r["recompute"]): r["tokens_per_s"] for r in rows
           if r["base"] == "bf16-frozen" and "tokens_per_s" in r}
    lines = [f"{device_and_versions(info)}, bitsandbytes {info['bitsandbytes']}, transformers "
             f"{info['transformers']}, PEFT {info['peft']}; {info['date']}; L={args.L}, bf16 autocast "
             f"(Accelerate), fused AdamW, LoRA rank 8 on all targets, random init; frozen base in bf16 "
             f"(nf4: double quantisation; compute dtype bf16; in_proj/out_proj quantised, "
             f"nf4-embeddings: the embeddings too, read by the tied lm_head), "
             f"{args.warmup} warm-up + {args.steps} timed steps"
             + (f"; {BASELINE}: transformers' slow Mamba path, LoRA on in_proj + x_proj, its own "
                f"loss, 1 warm-up + {args.baseline_steps} timed" if any(r["base"] == BASELINE for r in rows)
                else "") + ".",
             "",
             "peak GiB: the training steps' peak allocation (the model built first); base MiB: every "
             "frozen base weight, a quantised one by its packed bytes + quantisation state; "
             "x bf16 base: against the bf16-frozen base of the same shape (the comparison's base is "
             "counted after prepare_model_for_kbit_training, which puts its unquantised weights in "
             "fp32); quantised x bf16: the quantised modules alone (in_proj, out_proj; "
             "nf4-embeddings: and the embeddings).",
             ""]
    body = []
    for r in rows:
        cells = [r["model"], r["base"], r.get("options", ""), r["batch"]]
        if "error" in r:
            cells += [r["error"], "", "", "", "", "", "", ""]
        else:
            against = ref.get((r["model"], r["batch"], r["recompute"]))
            cells += [f"{r['tokens_per_s']:,.0f}",
                      _fmt(r["tokens_per_s"] / against if against else None, ".2f", "x"),
                      _fmt(r["peak_GiB"], ".2f"), _fmt(r.get("resident_GiB"), ".2f"),
                      _fmt(r.get("base_bytes") and r["base_bytes"] / 2**20, ",.1f"),
                      _fmt(r.get("base_ratio"), ".3f", "x"),
                      _fmt(r.get("quantized_ratio"), ".3f", "x"),
                      f"{r['trainable']:,}"]
        body.append(cells)
    lines += markdown_table(["model", "base", "options", "batch", "tokens/s", "x bf16-frozen",
                             "peak GiB", "resident GiB", "base MiB", "x bf16 base",
                             "quantised x bf16", "trainable params"], body)
    return lines


def save(out: Path, info: dict, rows: list[dict], args) -> str:
    write_json(out, NAME, dict(info=info, args={k: str(v) for k, v in vars(args).items()}, rows=rows))
    return write_markdown(out, NAME, table_lines(info, rows, args))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["1.4b", "2.8b"], default=None, help="one model shape only")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--L", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 1],
                   help="micro-batches, each timed on the same built model (default 2 1)")
    p.add_argument("--bases", nargs="+", choices=BASES, default=BASES, help="which bases (default all)")
    p.add_argument("--recompute", nargs="+", choices=list(RECOMPUTE_OPTIONS), default=["none", "ssm"],
                   help="what the backward recomputes: none, ssm (model.recompute_ssm), blocks "
                        "(model.checkpoint_blocks); default none ssm")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the transformers + PEFT + bitsandbytes comparison")
    p.add_argument("--baseline-steps", type=int, default=1,
                   help="timed steps of the comparison, after 1 warm-up (default 1: its pure-PyTorch "
                        "scan is slow)")
    p.add_argument("--baseline-batch", type=int, nargs="+", default=None,
                   help="the comparison's micro-batches (default: the first of --batch)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="a tiny shape, L 64, 1 warm-up + 2 steps, on the CPU: checks the script end "
                        "to end (bitsandbytes 0.50 runs nf4 / int8 there)")
    args = p.parse_args()

    if args.cpu_dry_run:
        device = torch.device("cpu")
        names = ["tiny"]
        args.L, args.steps, args.warmup = min(args.L, 64), min(args.steps, 2), min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --cpu-dry-run)")
        device = torch.device("cuda", torch.cuda.current_device())
        names = [args.only] if args.only else ["1.4b", "2.8b"]
    baseline_shape = "tiny" if args.cpu_dry_run else "1.4b"
    baseline_batches = args.baseline_batch or args.batch[:1]
    baseline_skipped = None
    if args.no_baseline:
        baseline_skipped = "--no-baseline"
    elif baseline_shape not in names:
        baseline_skipped = f"the comparison runs on the {baseline_shape} shape, not in --only {args.only}"

    info = run_info(device, args.cpu_dry_run)
    info["baseline_skipped"] = baseline_skipped
    print(info, flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    baseline = None  # (shape, its bf16 base bytes), once its checkpoint is saved in tmp
    with tempfile.TemporaryDirectory(prefix="qlora_baseline_") as tmp:
        for name in names:
            t0 = time.perf_counter()
            master = build_master(name, device)
            bf16_bytes = base_weight_bytes(master)
            print(f"{name}: built in {time.perf_counter() - t0:.1f} s, bf16 base "
                  f"{bf16_bytes / 2**20:,.1f} MiB", flush=True)
            for base in args.bases:
                for recompute in args.recompute:
                    rows += run_mamba_ft(name, master, base, recompute, args.batch, args, device,
                                         bf16_bytes)
                    free(device)
                    save(args.out, info, rows, args)
            if name == baseline_shape and not args.no_baseline:
                error = save_checkpoint(master, tmp)
                if error:
                    rows += [dict(model=name, base=BASELINE, options="", recompute="none", L=args.L,
                                  batch=b, error=error) for b in baseline_batches]
                else:
                    baseline = (name, bf16_bytes)
            del master
            free(device)

        # Last: its pure-PyTorch scan is slow, and the mamba-ft rows come first.
        if baseline is not None:
            def on_rows(new_rows):
                rows.extend(new_rows)
                save(args.out, info, rows, args)

            run_baselines(baseline[0], tmp, baseline_batches, args, device, baseline[1], on_rows)
    info["total_s"] = time.perf_counter() - t_start
    print(save(args.out, info, rows, args))


if __name__ == "__main__":
    main()
