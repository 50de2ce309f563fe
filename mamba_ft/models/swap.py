"""Replace transformers' Mamba mixers (and a pure Mamba's RMSNorms) by mamba-ft's, in place.

Which transformers classes are replaced, and by what, is `mamba_ft.models.model_types`: the
Mamba-1 mixers (Mamba, FalconMamba, Jamba, Zamba's on heads) and the Mamba-2 mixers (Mamba-2
and the hybrids'), whose gated norm the mixer takes over; and the pure Mamba models' RMSNorms
(the same formula) for their blocks' and final norms. A type's weight-tied blocks (Zamba's
shared attention) become one module.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from mamba_ft.compat import warn_if_untested_transformers
from mamba_ft.models.model_types import MODEL_TYPES
from mamba_ft.modules import MIXER_CLASSES, MambaFTMamba2Mixer, MambaFTMixer, MambaFTRMSNorm


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__name__}"


# "module:Class" of each transformers mixer -> its model type's entry. Matching the exact class
# by name imports no modeling module a model does not use.
_MIXERS = {t.mixer_class: t for t in MODEL_TYPES.values()}
_NORMS = {path for t in MODEL_TYPES.values() for path in t.norm_classes}
_TIED_BLOCKS = {path for t in MODEL_TYPES.values() for path in t.tied_blocks}


def _swap(model: nn.Module, replace) -> int:
    """Replace every child for which `replace(child)` gives a module; return how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = replace(child)
            if new is not None:
                setattr(module, name, new)
                swapped += 1
    return swapped


def _mamba_ft_mixer(child: nn.Module) -> nn.Module | None:
    entry = _MIXERS.get(_class_path(type(child)))
    if entry is None:
        return None
    mixer = entry.replacement(child)
    mixer.ignored_keywords = entry.ignored_keywords
    return mixer


def swap_mixers(model: nn.Module) -> int:
    """Swap every transformers Mamba mixer (`model_types.MODEL_TYPES`) for mamba-ft's, holding
    the same tensors.

    Returns how many were swapped. Parameter names and shapes do not change, so state dicts,
    optimizers built afterwards and `save_pretrained` behave as with plain transformers. The
    type's weight-tied blocks become one module first (`share_tied_blocks`).
    """
    warn_if_untested_transformers()
    share_tied_blocks(model)
    return _swap(model, _mamba_ft_mixer)


def share_tied_blocks(model: nn.Module) -> int:
    """Make every use of a weight-tied block (`MambaModelType.tied_blocks`) the first one's
    module; returns how many uses were replaced.

    transformers' Zamba builds its shared attention + MLP block once per hybrid layer and ties
    the copies' parameters. They compute the same, but PEFT and the hybrid adapters see one
    module per copy, so each would get an adapter of its own while the weight they change is
    one: a merge would add them all to it. One module holds one adapter, trained by every use
    and merged once. Parameter names and the state dict do not change (the copies' parameters
    already were the same tensors).
    """
    first: dict[tuple[int, ...], nn.Module] = {}

    def shared(child: nn.Module) -> nn.Module | None:
        if _class_path(type(child)) not in _TIED_BLOCKS:
            return None
        params = tuple(id(p) for p in child.parameters())
        kept = first.setdefault(params, child) if params else child
        return None if kept is child else kept

    return _swap(model, shared)


def unshare_tied_blocks(model: nn.Module) -> int:
    """Undo `share_tied_blocks`: every use of a tied block after the first gets a copy of its
    own (equal weights, no longer the same tensors); returns how many.

    transformers ties Zamba's shared block only while `config.tie_word_embeddings` is true: a
    checkpoint whose embeddings were untied (a merge of an embeddings or lm_head adapter) must
    hold every copy, or transformers would load all but the first as missing."""
    seen: set[int] = set()

    def own_copy(child: nn.Module) -> nn.Module | None:
        if _class_path(type(child)) not in _TIED_BLOCKS:
            return None
        if id(child) not in seen:
            seen.add(id(child))
            return None
        return copy.deepcopy(child)

    return _swap(model, own_copy)


def swap_norms(model: nn.Module) -> int:
    """Swap every pure Mamba's transformers RMSNorm (MambaRMSNorm / Mamba2RMSNorm) for a
    MambaFTRMSNorm holding the same weight."""
    return _swap(model, lambda c: MambaFTRMSNorm(c) if _class_path(type(c)) in _NORMS else None)


def mixers(model: nn.Module) -> list[MambaFTMixer | MambaFTMamba2Mixer]:
    """Every mamba-ft mixer in the model, Mamba-1 and Mamba-2 alike."""
    return [m for m in model.modules() if isinstance(m, MIXER_CLASSES)]


@contextmanager
def document_starts(model: nn.Module, starts: torch.Tensor | None):
    """Within the block, mixers treat `starts` (batch, L) bool as document boundaries.

    Packed rows hold several documents; at each start the recurrent state and the conv window
    begin afresh, so no document sees another. Run the backward inside the block too: gradient
    checkpointing recomputes the forward there.
    """
    targets = mixers(model)
    for mixer in targets:
        mixer.document_starts = starts
    try:
        yield
    finally:
        for mixer in targets:
            mixer.document_starts = None


def packed_position_ids(starts: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at each document start of (batch, L) bool `starts`.

    Given these and no attention mask, transformers' mask builder (`create_causal_mask`) sees
    the packed format and makes the hybrids' attention block-diagonal, one block per document,
    as `document_starts` makes their Mamba layers restart."""
    index = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def set_recompute_ssm(model: nn.Module, enabled: bool) -> int:
    """Recompute each mixer's SSM branch in the backward instead of storing its activations.

    Per layer the backward then keeps only the in_proj output; the conv output, delta, B, C
    and the scan's chunk states are rebuilt by running conv -> x_proj -> dt_proj -> scan
    (Mamba-2: conv -> SSD scan) once more. Returns how many mixers were set.
    """
    targets = mixers(model)
    for mixer in targets:
        mixer.recompute_ssm = enabled
    return len(targets)
