"""Checks and builders the loop's setup phase calls: launches mamba-ft refuses, the datasets a
recipe names, the tokenizer and pad id."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mamba_ft import data as data_lib
from mamba_ft.errors import UserError
from mamba_ft.recipe import Recipe
from mamba_ft.training import distributed


def build_accelerator(recipe: Recipe, trackers: list[str], fsdp2):
    """The run's Accelerator: mixed precision, accumulation, trackers, the fp16 loss scale."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradScalerKwargs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = recipe.precision_policy()
    policy.check(adapter=recipe.adapter is not None, merge_at_end=recipe.run.merge_at_end,
                 cuda_graphs=recipe.run.cuda_graphs_forced, device=device, fsdp2=fsdp2 is not None)
    # Accelerate keeps its settings in process-wide singletons; a second train() call in the
    # same process (tests, sweeps) may ask for another precision, so start them afresh. The
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    with distributed.plain_multiprocess_accelerate() if fsdp2 is not None else nullcontext():
        return Accelerator(
            mixed_precision=policy.accelerate_mixed_precision(device),
            gradient_accumulation_steps=recipe.run.grad_accum_steps,
            log_with=trackers or None,
            project_dir=recipe.run.output_dir,
            cpu=device.type == "cpu",  # also makes a multi-process launch without GPUs use gloo
            kwargs_handlers=[GradScalerKwargs(init_scale=policy.fp16_init_scale)],
        )


def build_model(recipe: Recipe, model, tokenizer, train_dataset):
    """(model, tokenizer, adapter report): loaded (or given), adapters attached, the precision
    policy applied; refusals for settings the model cannot honour."""
    if model is None:
        from mamba_ft.models import load_model

        loaded = load_model(recipe.model.source, tokenizer=recipe.model.tokenizer,
                            need_tokenizer=tokenizer is None or train_dataset is None,
                            allow_transformers=recipe.model.kind != "mamba",
                            seed=recipe.model.init_seed if recipe.model.init_seed is not None else recipe.run.seed,
                            quantize=recipe.model.quantize.for_precision(recipe.precision.mode))
        model, is_mamba = loaded.model, loaded.is_mamba
        _print_main(loaded.quantization)
        tokenizer = tokenizer or loaded.tokenizer
        if recipe.model.kind == "transformer" and is_mamba:
            raise UserError(f"model.kind is 'transformer' but {recipe.model.source} is a Mamba; "
                            f"set model.kind: mamba (or auto).")
    else:
        from mamba_ft.models import mixers

        is_mamba = bool(mixers(model))
        if tokenizer is None and train_dataset is None:
            tokenizer = recipe_tokenizer(recipe)
        from mamba_ft.models.quantize import quantization_of, quantize_model

        if recipe.model.quantize.enabled and quantization_of(model) is None:  # a given model too
            _print_main(quantize_model(model, recipe.model.quantize.for_precision(recipe.precision.mode)))
    if recipe.model.recompute_ssm:
        if not is_mamba:
            raise UserError("model.recompute_ssm applies to Mamba mixers only; this model is a "
                            "Transformer. Set model.recompute_ssm: false.")
        from mamba_ft.models import set_recompute_ssm

        set_recompute_ssm(model, True)
    if recipe.model.checkpoint_blocks:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"model.checkpoint_blocks: {type(model).__name__} does not support "
                            f"transformers' gradient checkpointing; set it to false.")
        # Non-reentrant: it needs no input that requires a gradient (a frozen embedding under
        # adapters has none) and keeps the custom autograd functions of the kernels intact.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.data.packing and is_mamba:
        from mamba_ft.models.model_types import check_packing

        check_packing(model)
    if recipe.data.packing and not is_mamba:
        raise UserError("data.packing is only supported for Mamba models (their state restarts at "
                        "document starts); a Transformer baseline would attend across documents. "
                        "Set data.packing: false.")

    adapter_report = None
    if recipe.adapter is not None:
        from mamba_ft.adapters import attach_adapters

        adapter_report = attach_adapters(model, recipe.adapter)
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(adapter_report.format())
    recipe.precision_policy().apply(model)
    if recipe.run.chunked_head_loss:
        from mamba_ft.training.loss import HEAD_ONLY_TYPES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in HEAD_ONLY_TYPES:
            raise UserError(f"run.chunked_head_loss applies where the logits are the head of the "
                            f"last hidden states, and {model_type!r} models change them after "
                            f"(or are untested): it works for {', '.join(HEAD_ONLY_TYPES)}; set "
                            f"run.chunked_head_loss: false.")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("Nothing to train: no parameter requires a gradient.")
    return model, tokenizer, adapter_report


def _print_main(report) -> None:
    """The quantisation report (models/quantize.py), printed once."""
    from accelerate import PartialState

    if report is not None and PartialState().is_main_process:
        print(report.format())


def check_distributed(accelerator) -> None:
    """Refuse the launches mamba-ft cannot yet run correctly, before anything is loaded."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # Only reached when Accelerate's own FSDP path is active (an FSDP plugin passed in code):
        # FSDP2 launches are sharded by mamba-ft itself (distributed.fsdp2_from_launch).
        raise UserError("Accelerate's own FSDP path is not supported; launch with "
                        "accelerate launch --config_file configs/accelerate/fsdp2.yaml (mamba-ft shards "
                        "the model itself) or configs/accelerate/ddp.yaml.")
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                            DistributedType.MULTI_CPU):
        raise UserError(f"Accelerate's {accelerator.distributed_type.value} launch is not supported; "
                        f"use configs/accelerate/ddp.yaml or configs/accelerate/fsdp2.yaml "
                        f"(or no launcher on one device).")


def check_cuda_graphs(recipe: Recipe, accelerator) -> None:
    """Refuse `run.cuda_graphs: true` where it cannot run (`auto` resolves to off there instead:
    graph_decision.py)."""
    if not recipe.run.cuda_graphs_forced:
        return
    if accelerator.device.type != "cuda":
        raise UserError("run.cuda_graphs needs a CUDA GPU and this run is on the CPU; set "
                        "run.cuda_graphs: false.")
    if accelerator.num_processes > 1:
        raise UserError(f"run.cuda_graphs runs on one GPU and this launch has "
                        f"{accelerator.num_processes} processes; launch without accelerate's "
                        f"multi-process configs, or set run.cuda_graphs: false.")


def check_chunked_head_loss(recipe: Recipe, accelerator, fsdp2) -> None:
    """The launches `run.chunked_head_loss` is built and tested for: one process, eager steps.
    (DDP would see the head used outside its forward; a graphed step and FSDP2's resharding
    of the head are untested with it.)"""
    run = recipe.run
    if not run.chunked_head_loss:
        return
    if accelerator.num_processes > 1 or fsdp2 is not None:
        raise UserError(f"run.chunked_head_loss runs in one process and this launch has "
                        f"{accelerator.num_processes}; set run.chunked_head_loss: false.")
    if run.cuda_graphs_forced:
        raise UserError("run.chunked_head_loss does not run with run.cuda_graphs yet; set one of "
                        "them to false.")


def datasets(recipe, tokenizer, train_dataset, eval_dataset, accelerator):
    """Tokenized train/eval datasets: given ones as they are, else built from data section."""
    if train_dataset is not None:
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is not None and not {"input_ids", "labels"} <= set(ds.column_names):
                raise UserError(f"{name} must have columns input_ids and labels; found "
                                f"{', '.join(ds.column_names)}.")
        return train_dataset, eval_dataset
    # The main process tokenizes first; the others then read datasets' cache.
    with accelerator.main_process_first():
        built = {}
        for what, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
            if source is None:
                built[what] = None
                continue
            tokenized = data_lib.tokenize_rows(data_lib.load_rows(source, what), recipe.data, tokenizer, what)
            if accelerator.is_main_process and (tokenized.n_truncated or tokenized.n_dropped):
                print(f"{what}: {tokenized.n_truncated} of {tokenized.n_examples} examples truncated to "
                      f"{recipe.data.max_length} tokens, {tokenized.n_dropped} dropped (no target left)")
            built[what] = tokenized.dataset
    return built["train"], built["eval"]


def recipe_tokenizer(recipe: Recipe):
    """The tokenizer a recipe names (model.tokenizer, else beside model.source)."""
    from mamba_ft.models import load_tokenizer, resolve_source

    where = recipe.model.tokenizer or recipe.model.source
    if not isinstance(where, str):
        raise UserError("The data must be tokenized but the recipe names no tokenizer; set model.tokenizer.")
    return load_tokenizer(resolve_source(where), where)


def pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0
