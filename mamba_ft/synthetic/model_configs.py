"""Model configs for training from scratch: a Mamba, and a Transformer of matched size.

Parameters are counted exactly by building the model on the meta device (no memory, no init).
The Transformer's layer count and head size are fixed; its width is the multiple of the head
size whose count (with the usual 4x MLP) comes closest to the target, then the MLP's
intermediate size is moved (within 2x-6x the width) to close the rest of the gap, so matched
counts differ by about one MLP unit (a few hundred parameters) rather than one width step.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mamba_ft.errors import UserError

TRANSFORMER_FAMILIES = ("llama", "gpt_neox")
# Position encodings: "rope" rotates every query and key dimension; "nope" adds no position
# information at all (causal attention alone orders the tokens); "hard_alibi" is NoPE where some
# heads see only the last few tokens. Jelassi et al. found the last two to copy past the training
# length. Only GPT-NeoX can turn rotation off (rotary_pct 0 rotates zero dimensions); Llama's
# attention always rotates the whole head.
POSITION_ENCODINGS = ("rope", "nope", "hard_alibi")
HARD_ALIBI = "hard_alibi"  # the attention implementation's registered name


def _hard_alibi_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention where head h sees only keys fewer than `hard_alibi_windows[h]` positions
    back (itself included; 0: no limit, a NoPE head), on top of the causal and padding mask.

    Registered through transformers' public AttentionInterface, so GPT-NeoX calls it in place
    of SDPA in training, in full forwards and in cached generation alike. Queries are the last
    positions of the keys (a prefill, or one decoding step with the cache before it)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    distance = (torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
                - torch.arange(k_len, device=query.device)[None, :])
    windows = torch.tensor([w or k_len for w in module.config.hard_alibi_windows], device=query.device)
    allowed = (distance >= 0) & (distance < windows[:, None, None])  # heads x queries x keys
    # SDPA's mask function gives a boolean mask (True: may attend); `&` refuses any other kind.
    allowed = allowed[None] if attention_mask is None else allowed[None] & attention_mask
    return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)


AttentionInterface.register(HARD_ALIBI, _hard_alibi_attention)
# The causal and padding mask in SDPA's form (boolean, or None where causality alone applies).
AttentionMaskInterface.register(HARD_ALIBI, sdpa_mask)


def mamba_config(vocab_size: int, d_model: int, n_layer: int, d_state: int, expand: int = 2,
                 d_conv: int = 4) -> dict:
    for name, value, lo, hi in (("d_model", d_model, 4, 8192), ("n_layer", n_layer, 1, 128),
                                ("d_state", d_state, 1, 1024), ("expand", expand, 1, 8)):
        if not lo <= value <= hi:
            raise UserError(f"Mamba {name}={value} is out of range; use {lo} to {hi}.")
    return {"model_type": "mamba", "vocab_size": vocab_size, "hidden_size": d_model,
            "num_hidden_layers": n_layer, "state_size": d_state, "expand": expand, "conv_kernel": d_conv,
            "tie_word_embeddings": True, "use_cache": True, "pad_token_id": None,
            "bos_token_id": None, "eos_token_id": None}


def transformer_config(family: str, vocab_size: int, hidden: int, n_layer: int, head_dim: int,
                       max_positions: int, intermediate: int | None = None, position: str = "rope",
                       hard_alibi_windows: tuple[int, ...] = (2, 4)) -> dict:
    if family not in TRANSFORMER_FAMILIES:
        raise UserError(f"Transformer family {family!r} is not supported; use one of "
                        f"{', '.join(TRANSFORMER_FAMILIES)}.")
    if position not in POSITION_ENCODINGS:
        raise UserError(f"Transformer position={position!r} is not supported; use one of "
                        f"{', '.join(POSITION_ENCODINGS)}.")
    if position != "rope" and family != "gpt_neox":
        raise UserError(f"Transformer position {position!r} needs family 'gpt_neox' ({family} always "
                        f"applies rotary embeddings); set models.transformer.family: gpt_neox.")
    if hidden % head_dim or head_dim % 2:
        raise UserError(f"Transformer width {hidden} must be a multiple of the head size {head_dim} "
                        f"(an even number, for rotary embeddings).")
    if not 1 <= n_layer <= 128:
        raise UserError(f"Transformer n_layer={n_layer} is out of range; use 1 to 128.")
    common = {"vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": n_layer,
              "num_attention_heads": hidden // head_dim, "intermediate_size": intermediate or 4 * hidden,
              "max_position_embeddings": max_positions, "tie_word_embeddings": True,
              "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if family == "llama":
        return {"model_type": "llama", **common, "num_key_value_heads": hidden // head_dim}
    config = {"model_type": "gpt_neox", **common, "rotary_pct": 1.0 if position == "rope" else 0.0,
              "use_parallel_residual": True}
    if position == HARD_ALIBI:
        heads = hidden // head_dim
        if not heads > len(hard_alibi_windows) or min(hard_alibi_windows) < 1:
            raise UserError(f"Hard-ALiBi windows {list(hard_alibi_windows)} need positive sizes and more heads "
                            f"than windows (at least one head without a window); width {hidden} has {heads} "
                            f"heads of {head_dim}.")
        # One entry per head: the windowed heads first, then the NoPE heads (0).
        windows = list(hard_alibi_windows) + [0] * (heads - len(hard_alibi_windows))
        config.update(attn_implementation=HARD_ALIBI, hard_alibi_windows=windows)
    return config


def count_parameters(config: dict) -> int:
    data = dict(config)
    model_type = data.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    # Tied embeddings are one tensor: count unique storage once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def matched_transformer(target_params: int, family: str, vocab_size: int, n_layer: int,
                        head_dim: int, max_positions: int, position: str = "rope",
                        hard_alibi_windows: tuple[int, ...] = (2, 4)) -> tuple[dict, int]:
    """The Transformer config (and its parameter count) closest in size to `target_params`.
    Position encodings have no parameters, so the size is searched with RoPE (whatever the
    width's head count) and every encoding gets the same width and MLP."""
    def build(width):
        return transformer_config(family, vocab_size, width * head_dim, n_layer, head_dim, max_positions)

    lo, hi = 1, 1
    while count_parameters(build(hi)) < target_params and hi < 1024:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # parameter count grows with width: bisect for the crossing
        mid = (lo + hi) // 2
        if count_parameters(build(mid)) < target_params:
            lo = mid
        else:
            hi = mid
    width = min((lo, hi), key=lambda w: abs(count_parameters(build(w)) - target_params))
    hidden = width * head_dim

    def with_mlp(intermediate):
        return transformer_config(family, vocab_size, hidden, n_layer, head_dim, max_positions, intermediate)

    base = count_parameters(with_mlp(4 * hidden))
    per_unit = count_parameters(with_mlp(4 * hidden + 1)) - base  # parameters per MLP unit
    intermediate = 4 * hidden + round((target_params - base) / per_unit)
    config = transformer_config(family, vocab_size, hidden, n_layer, head_dim, max_positions,
                                min(max(intermediate, 2 * hidden), 6 * hidden), position, hard_alibi_windows)
    return config, count_parameters(config)
