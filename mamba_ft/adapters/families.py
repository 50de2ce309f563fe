"""Which mixer class has which adapter targets: the one place that knows.

Each `MixerFamily` binds a mamba-ft mixer class to its target vocabulary (`config.TargetFamily`:
names, aliases, row blocks, what PEFT can hold) and to the adapter module that fills its
`mixer_weights()` hook. A new family (the hybrids' mixers) adds one entry to `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mamba_ft.adapters.config import MAMBA1, MAMBA2, ZAMBA, TargetFamily
from mamba_ft.adapters.lora import MixerAdapter
from mamba_ft.adapters.mamba2_lora import Mamba2MixerAdapter
from mamba_ft.errors import UserError
from mamba_ft.modules import MambaFTMamba2Mixer, MambaFTMixer, MambaFTZambaMixer


@dataclass(frozen=True)
class MixerFamily:
    mixer_class: type[nn.Module]
    targets: TargetFamily
    adapter_class: type[nn.Module]  # a lora.MixerAdapterBase: (mixer, targets, rank_for, scale_for, dropout)


FAMILIES = (
    MixerFamily(MambaFTMixer, MAMBA1, MixerAdapter),
    # Mamba-1 on heads: the same adapter, its x_proj / dt_proj deltas per head.
    MixerFamily(MambaFTZambaMixer, ZAMBA, MixerAdapter),
    MixerFamily(MambaFTMamba2Mixer, MAMBA2, Mamba2MixerAdapter),
)


def family_of_mixer(mixer: nn.Module) -> MixerFamily:
    for family in FAMILIES:
        if type(mixer) is family.mixer_class:
            return family
    raise UserError(f"mamba-ft has no adapters for the mixer {type(mixer).__name__}; the supported "
                    f"mixers are {', '.join(f.mixer_class.__name__ for f in FAMILIES)}.")


def family_of_model(mixers: list[nn.Module]) -> MixerFamily:
    """The one family of a model's mixers (a model mixing families is not supported yet)."""
    found: list[MixerFamily] = []
    for mixer in mixers:
        family = family_of_mixer(mixer)
        if not any(family is f for f in found):
            found.append(family)
    if len(found) != 1:
        raise UserError(f"This model mixes mixer families ({', '.join(f.targets.name for f in found)}); "
                        f"adapters support one family per model.")
    return found[0]

