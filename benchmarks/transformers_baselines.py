"""The baselines train_throughput.py times beside mamba-ft in the same run: plain transformers
(+ PEFT) as users run it today, on the same random-init shapes.

- `pythia-160m` / `pythia-1.4b`: GPT-NeoX in Pythia's shapes (vocab 50304, rotary 25%), SDPA
  attention; full fine-tuning, or PEFT LoRA on `query_key_value` and `dense`.
- `mamba2-130m` / `mamba2-1.3b`: transformers' `Mamba2ForCausalLM` in the shapes
  train_throughput builds for mamba-ft; full, or PEFT LoRA on `in_proj` (the one Mamba buffer
  that trains there: transformers' fused training path reads out_proj's raw weight).
- `nemotron_h-1b`: transformers' `NemotronHForCausalLM` at a ~1.2B shape (the same config
  mamba-ft's row loads); PEFT LoRA on in_proj and every attention / MLP Linear (PEFT refuses
  out_proj and conv1d for this model type).

mamba_ssm's Triton SSD (`mamba_chunk_scan_combined`, from an unpacked source tree, see
`patch_mamba_ssm_ssd`) is patched into transformers' Mamba-2 mixers, which otherwise run a
PyTorch SSD. transformers' training path would call mamba_ssm's `mamba_split_conv1d_scan_combined`
instead, which needs the compiled causal-conv1d package; the patch turns that one off, so the
mixer runs its own conv, the Triton SSD, its gated norm and out_proj, each as a module call.
Each row counts the patched SSD's calls, so a row that silently ran the PyTorch SSD fails.

The step is what a user of transformers writes: `model(input_ids, labels=input_ids).loss`
(full fp32 logits, transformers' loss) under the same bf16 Accelerator autocast, backward,
fused AdamW.
"""

from __future__ import annotations

import inspect

import torch

VOCAB_MAMBA = 50280


def pythia_config(name: str) -> dict:
    hidden, layers, heads = {"pythia-160m": (768, 12, 12), "pythia-1.4b": (2048, 24, 16)}[name]
    # Positions past Pythia's trained 2,048 are only for the long-context speed rows: rotary
    # embeddings are computed for any position.
    return dict(model_type="gpt_neox", vocab_size=50304, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2**18,
                use_parallel_residual=True, tie_word_embeddings=False, use_cache=False)


def mamba_config(hidden_size: int, num_hidden_layers: int) -> dict:
    """Mamba-1 in the shapes of state-spaces/mamba-130m / -1.4b (state 16, expand 2, conv 4)."""
    return dict(model_type="mamba", vocab_size=VOCAB_MAMBA, hidden_size=hidden_size,
                num_hidden_layers=num_hidden_layers, state_size=16, expand=2, conv_kernel=4,
                use_cache=False)


def mamba2_config(hidden_size: int, num_hidden_layers: int) -> dict:
    """Mamba-2 in the shapes of state-spaces/mamba2-130m / -1.3b (head_dim 64, state 128, one
    B/C group, chunk 256)."""
    d_inner = 2 * hidden_size
    return dict(model_type="mamba2", vocab_size=VOCAB_MAMBA, hidden_size=hidden_size,
                num_hidden_layers=num_hidden_layers, expand=2, head_dim=64,
                num_heads=d_inner // 64, n_groups=1, state_size=128, conv_kernel=4,
                chunk_size=256, tie_word_embeddings=True, use_cache=False)


def nemotron_h_config() -> dict:
    """A ~1.2B Nemotron-H: d_model 2048, 24 layers (10 Mamba-2, 2 attention, 12 MLP, the
    family's Mamba/MLP alternation), Mamba-2 with 64 heads of 64, 8 groups, state 128."""
    layers = []
    for i in range(12):
        layers += ["attention" if i in (4, 9) else "mamba", "mlp"]
    return dict(model_type="nemotron_h", vocab_size=131072, hidden_size=2048,
                layers_block_type=layers, num_hidden_layers=len(layers),
                num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                intermediate_size=8192, mamba_num_heads=64, mamba_head_dim=64, n_groups=8,
                ssm_state_size=128, conv_kernel=4, expand=2, chunk_size=256,
                tie_word_embeddings=False, use_cache=False)


# PEFT LoRA targets per baseline model (`lora` mode).
LORA_TARGETS = {
    "pythia-160m": ["query_key_value", "dense"],
    "pythia-1.4b": ["query_key_value", "dense"],
    "mamba2-130m": ["in_proj"],
    "mamba2-1.3b": ["in_proj"],
    # PEFT refuses out_proj and conv1d for nemotron_h ("incompatible with Mamba-based models")
    "nemotron_h-1b": ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


def patch_mamba_ssm_ssd(mamba_ssm_src) -> dict:
    """Patch mamba_ssm's Triton `mamba_chunk_scan_combined` into transformers' Mamba-2 and
    Nemotron-H modeling modules (see the module docstring); returns the call counter."""
    from bench_common import stub_mamba_ssm_package

    stub_mamba_ssm_package(mamba_ssm_src)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.models.nemotron_h import modeling_nemotron_h

    calls = {"ssd": 0}
    accepted = set(inspect.signature(mamba_chunk_scan_combined).parameters)

    def ssd(*args, **kwargs):
        calls["ssd"] += 1
        # transformers hands its scan function the decoder's keywords too; its own dispatch
        # drops those the implementation does not take, and so does this one.
        return mamba_chunk_scan_combined(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    for module in (modeling_mamba2, modeling_nemotron_h):
        module.mamba2_chunk_scan = ssd
        module.mamba2_split_conv1d_scan_combined = lambda *args, **kwargs: None
    return calls


def build(name: str) -> torch.nn.Module:
    if name.startswith("pythia"):
        config = pythia_config(name)
    elif name == "nemotron_h-1b":
        config = nemotron_h_config()
    else:
        config = mamba2_config(*{"mamba2-130m": (768, 24), "mamba2-1.3b": (2048, 48)}[name])
    return from_config(config)


def from_config(config: dict) -> torch.nn.Module:
    """Plain transformers' causal LM of `config` (a dict with its model_type), seed 0; SDPA
    where the model has attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    kwargs = {"attn_implementation": "sdpa"} if model_type in ("gpt_neox", "nemotron_h") else {}
    return AutoModelForCausalLM.from_config(cfg, **kwargs)


def make_step(name: str, mode: str, batch: int, L: int, accelerator, ssd_calls: dict | None,
              checkpointing: bool = False):
    """(step, trainable, losses) for a baseline row, as train_throughput.make_step;
    `checkpointing`: transformers' gradient checkpointing of every layer."""
    with torch.device("cuda"):
        model = build(name).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=LORA_TARGETS[name]))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = model.config.vocab_size if mode == "full" else model.base_model.config.vocab_size
    ids = torch.randint(0, min(vocab, VOCAB_MAMBA), (batch, L), device="cuda")
    losses = []
    uses_ssd = not name.startswith("pythia")

    def step():
        before = ssd_calls["ssd"] if (uses_ssd and ssd_calls is not None) else None
        with accelerator.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if uses_ssd and (ssd_calls is None or ssd_calls["ssd"] == before):
            raise RuntimeError("transformers ran its PyTorch SSD, not mamba_ssm's Triton one: "
                               "pass --mamba-ssm-src")

    return step, trainable, losses
