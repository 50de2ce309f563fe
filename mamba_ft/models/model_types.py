"""The transformers model types whose layers hold a Mamba mixer, and how mamba-ft serves each.

One `MambaModelType` per model type says which transformers class holds its Mamba mixers, which
mamba-ft mixer replaces them (they take over the transformers module's parameters under the same
names), and what else the swap must know. Adding a model type is one entry here; the loader,
the swap, the adapters and the training loop read this table and nothing type-specific.

Pure Mamba models (`mamba`, `mamba2`) also get mamba-ft's RMSNorm for their blocks' and final
norms; the hybrids keep every layer but the mixers as transformers builds them (attention, MLP,
MoE, their norms).

Tested per type in tests/models/test_model_types.py: logits and greedy decoding equal plain
transformers' on the same weights.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

from mamba_ft.modules import MambaFTMamba2Mixer, MambaFTMixer, MambaFTZambaMixer


@dataclass(frozen=True)
class MambaModelType:
    model_type: str
    name: str  # as users know it
    mixer_class: str  # "module:Class" of the transformers mixer mamba-ft replaces
    replacement: type[nn.Module]  # mamba-ft's mixer, constructed from the transformers one
    causal_lm_class: str | None = None  # "module:Class"; None: AutoModelForCausalLM picks it
    norm_classes: tuple[str, ...] = ()  # RMSNorms swapped for MambaFTRMSNorm (pure Mamba only)
    # Keywords the model's blocks hand the mixer that mean nothing to it (Zamba2 passes the
    # shared attention's rotary embeddings to every layer); any other unknown one stays an error.
    ignored_keywords: frozenset[str] = field(default_factory=frozenset)
    hybrid: bool = False  # attention / MLP layers beside the Mamba ones
    # A hybrid's attention keeps packed documents apart when its model hands position ids to
    # transformers' mask builder (`models.packed_position_ids`); one that does not would let
    # documents attend to each other, so packing is refused for it.
    packs: bool = True
    # "module:Class" of blocks transformers builds once per use but ties by weights (Zamba's
    # shared attention + MLP: one copy per hybrid layer, all holding the same tensors, tied
    # while config.tie_word_embeddings is true). The swap makes them one module, as the weights
    # are one, so an adapter on them is one adapter too (and merges into the one weight).
    tied_blocks: tuple[str, ...] = ()
    # The causal LM's logits are its head applied to the last hidden states and nothing more,
    # so the loss may run the head itself, a chunk of rows at a time (run.chunked_head_loss).
    # False where transformers scales them after the head (Falcon-H1, Granite-4.0-H).
    head_only_logits: bool = True
    # `run.cuda_graphs: auto` graphs this type's training step: nothing in its forward or
    # backward waits on the host, and its graphed training has been compared with eager on a
    # GPU (tests/training/test_cuda_graph.py). Mamba-2 and FalconMamba have the same test
    # written, not yet run on a GPU, so they stay off until it passes. The hybrids stay off:
    # transformers' MoE routing picks experts on the host, and their attention paths are
    # untested under capture.
    graphs_by_default: bool = False
    example_checkpoint: str = ""  # a Hub id of this type, for messages and recipes

    def load_class(self, path: str) -> type:
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    def transformers_mixer(self) -> type[nn.Module]:
        return self.load_class(self.mixer_class)


_T = "transformers.models."
MODEL_TYPES: dict[str, MambaModelType] = {t.model_type: t for t in (
    MambaModelType("mamba", "Mamba", _T + "mamba.modeling_mamba:MambaMixer", MambaFTMixer,
                   causal_lm_class=_T + "mamba.modeling_mamba:MambaForCausalLM",
                   norm_classes=(_T + "mamba.modeling_mamba:MambaRMSNorm",),
                   graphs_by_default=True, example_checkpoint="state-spaces/mamba-130m-hf"),
    MambaModelType("mamba2", "Mamba-2", _T + "mamba2.modeling_mamba2:Mamba2Mixer",
                   MambaFTMamba2Mixer,
                   causal_lm_class=_T + "mamba2.modeling_mamba2:Mamba2ForCausalLM",
                   norm_classes=(_T + "mamba2.modeling_mamba2:Mamba2RMSNorm",),
                   example_checkpoint="state-spaces/mamba2-130m"),
    MambaModelType("falcon_mamba", "FalconMamba",
                   _T + "falcon_mamba.modeling_falcon_mamba:FalconMambaMixer", MambaFTMixer,
                   causal_lm_class=_T + "falcon_mamba.modeling_falcon_mamba:FalconMambaForCausalLM",
                   norm_classes=(_T + "falcon_mamba.modeling_falcon_mamba:FalconMambaRMSNorm",),
                   example_checkpoint="tiiuae/falcon-mamba-7b"),
    MambaModelType("jamba", "Jamba", _T + "jamba.modeling_jamba:JambaMambaMixer", MambaFTMixer,
                   hybrid=True, example_checkpoint="ai21labs/AI21-Jamba-Mini-1.7"),
    MambaModelType("bamba", "Bamba", _T + "bamba.modeling_bamba:BambaMixer", MambaFTMamba2Mixer,
                   hybrid=True, example_checkpoint="ibm-ai-platform/Bamba-9B-v2"),
    MambaModelType("nemotron_h", "Nemotron-H",
                   _T + "nemotron_h.modeling_nemotron_h:NemotronHMamba2Mixer", MambaFTMamba2Mixer,
                   hybrid=True, example_checkpoint="nvidia/NVIDIA-Nemotron-Nano-9B-v2"),
    MambaModelType("granitemoehybrid", "Granite-4.0-H",
                   _T + "granitemoehybrid.modeling_granitemoehybrid:GraniteMoeHybridMambaLayer",
                   MambaFTMamba2Mixer, hybrid=True, packs=False, head_only_logits=False,
                   example_checkpoint="ibm-granite/granite-4.0-h-tiny"),
    MambaModelType("falcon_h1", "Falcon-H1", _T + "falcon_h1.modeling_falcon_h1:FalconH1Mixer",
                   MambaFTMamba2Mixer, hybrid=True, head_only_logits=False,
                   example_checkpoint="tiiuae/Falcon-H1-1.5B-Instruct"),
    MambaModelType("zamba", "Zamba", _T + "zamba.modeling_zamba:ZambaMambaMixer",
                   MambaFTZambaMixer, hybrid=True,
                   tied_blocks=(_T + "zamba.modeling_zamba:ZambaAttentionDecoderLayer",),
                   example_checkpoint="Zyphra/Zamba-7B-v1"),
    MambaModelType("zamba2", "Zamba2", _T + "zamba2.modeling_zamba2:Zamba2MambaMixer",
                   MambaFTMamba2Mixer, ignored_keywords=frozenset({"position_embeddings"}),
                   hybrid=True, example_checkpoint="Zyphra/Zamba2-1.2B"),
)}


def mamba_model_type(model_type: str | None) -> MambaModelType | None:
    """The entry for a model type mamba-ft serves, None for any other (a Transformer)."""
    return MODEL_TYPES.get(model_type)


def is_hybrid(model: nn.Module) -> bool:
    """Whether `model` is of a hybrid type (attention / MLP layers beside the Mamba ones)."""
    entry = mamba_model_type(getattr(getattr(model, "config", None), "model_type", None))
    return entry is not None and entry.hybrid


def check_packing(model: nn.Module) -> None:
    """UserError when packed rows cannot keep this model's documents apart."""
    from mamba_ft.errors import UserError

    entry = mamba_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if entry is not None and not entry.packs:
        raise UserError(f"data.packing is not supported for {entry.name}: transformers builds its "
                        f"attention mask without the position ids, so packed documents would "
                        f"attend to each other. Set data.packing: false.")


def supported_names() -> str:
    return ", ".join(f"{t.name} ('{t.model_type}')" for t in MODEL_TYPES.values())
