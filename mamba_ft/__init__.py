"""mamba-ft: fine-tune Mamba state-space language models with adapters that really train."""

__version__ = "0.1.0"
