"""The layers mamba-ft swaps into transformers models: each holds the parameters of the
transformers module it replaces, under the same names, and computes through `mamba_ft.ops`."""

from mamba_ft.modules.gated_rms_norm import MambaFTRMSNormGated
from mamba_ft.modules.mamba2_mixer import Mamba2MixerWeights, MambaFTMamba2Mixer
from mamba_ft.modules.mamba_mixer import MambaFTMixer, MixerWeights
from mamba_ft.modules.rms_norm import MambaFTRMSNorm

# Every mamba-ft mixer class, for code that serves both families (swap.mixers and friends).
MIXER_CLASSES = (MambaFTMixer, MambaFTMamba2Mixer)

__all__ = ["MIXER_CLASSES", "Mamba2MixerWeights", "MambaFTMamba2Mixer", "MambaFTMixer",
           "MambaFTRMSNorm", "MambaFTRMSNormGated", "MixerWeights"]
