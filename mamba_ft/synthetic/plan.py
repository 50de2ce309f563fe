"""Which models a synthetic spec trains: one `ModelPlan` per Mamba width x state size, per
width and `d_state_per_length` factor k one length-scaled Mamba (d_state = ceil(k x L), L the
longest training length of the group being planned), and per Transformer position encoding one
Transformer matched in parameters to each Mamba width.

Shared by the runner and by the spec's own checks (a setting that cannot be planned stops at
load time), so it does not import the spec module: `spec` is a `spec.SynthSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from mamba_ft.synthetic.base import Task
from mamba_ft.synthetic.model_configs import count_parameters, mamba_config, matched_transformer


@dataclass
class ModelPlan:
    name: str
    family: str  # "mamba" or the Transformer family
    config: dict
    params: int
    d_model: int
    d_state: int | None  # Mamba only
    state_floats: int | None  # recurrent state per sequence (Mamba); None: grows with length
    position: str | None = None  # the Transformer's position encoding (rope, nope, hard_alibi); None: Mamba
    d_state_per_length: float | None = None  # a length-scaled Mamba's factor k (d_state = ceil(k x L))


def plan_models(spec, task: Task, max_positions: int, max_train_length: int | None = None) -> list[ModelPlan]:
    """The models of one training range, whose longest length is `max_train_length` (default:
    `spec.train_lengths[1]`); it sets the length-scaled Mambas' d_state."""
    vocab_size = len(task.vocab)
    mamba = spec.models.mamba
    longest = max_train_length if max_train_length is not None else spec.train_lengths[1]
    plans = []
    for d_model in mamba.d_model:
        states = [(d_state, f"mamba-d{d_model}-N{d_state}", None) for d_state in mamba.d_state]
        # One name per factor across training ranges, so a results table follows one model over L.
        states += [(mamba.scaled_d_state(k, longest), f"mamba-d{d_model}-N{k:g}xL", k) for k in mamba.d_state_per_length]
        for d_state, name, per_length in states:
            config = mamba_config(vocab_size, d_model, mamba.n_layer, d_state, mamba.expand)
            plans.append(ModelPlan(name, "mamba", config, count_parameters(config), d_model, d_state,
                                   mamba.n_layer * mamba.expand * d_model * d_state,
                                   d_state_per_length=per_length))
    tf = spec.models.transformer
    if tf is not None:
        match_state = tf.match_d_state if tf.match_d_state is not None else mamba.d_state[0]
        for d_model in mamba.d_model:
            target = count_parameters(mamba_config(vocab_size, d_model, mamba.n_layer, match_state, mamba.expand))
            for position in tf.position:
                config, params = matched_transformer(target, tf.family, vocab_size, tf.n_layer, tf.head_dim,
                                                     max_positions, position, tuple(tf.hard_alibi_windows))
                # RoPE keeps the name it had before NoPE existed, so earlier results still resume.
                suffix = "" if position == "rope" else f"-{position}"
                plans.append(ModelPlan(f"{tf.family}-d{config['hidden_size']}{suffix}", tf.family, config, params,
                                       config["hidden_size"], None, None, position))
    return plans
