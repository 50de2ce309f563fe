"""The layers mamba-ft swaps into transformers models: each holds the parameters of the
transformers module it replaces, under the same names, and computes through `mamba_ft.ops`."""

from mamba_ft.modules.mamba_mixer import MambaFTMixer, MixerWeights
from mamba_ft.modules.rms_norm import MambaFTRMSNorm

__all__ = ["MambaFTMixer", "MambaFTRMSNorm", "MixerWeights"]
