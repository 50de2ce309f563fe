"""The layers mamba-ft swaps into transformers models: each holds the parameters of the
transformers module it replaces, under the same names, and computes through `mamba_ft.ops`."""

from mamba_ft.modules.gated_rms_norm import MambaFTRMSNormGated
from mamba_ft.modules.mamba2_mixer import Mamba2MixerWeights, MambaFTMamba2Mixer
from mamba_ft.modules.mamba_mixer import MambaFTMixer, MixerWeights
from mamba_ft.modules.rms_norm import MambaFTRMSNorm
from mamba_ft.modules.zamba_mixer import MambaFTZambaMixer

# Every mamba-ft mixer class, for code that serves them all (swap.mixers and friends); Zamba's
# is a Mamba-1 mixer on heads (a MambaFTMixer subclass).
MIXER_CLASSES = (MambaFTMixer, MambaFTZambaMixer, MambaFTMamba2Mixer)

__all__ = ["MIXER_CLASSES", "Mamba2MixerWeights", "MambaFTMamba2Mixer", "MambaFTMixer",
           "MambaFTRMSNorm", "MambaFTRMSNormGated", "MambaFTZambaMixer", "MixerWeights"]
