"""Model loading and the mixer and norm swaps."""

from mamba_ft.models.loading import LoadedModel, load_model, load_tokenizer, resolve_source
from mamba_ft.models.swap import (document_starts, mixers, packed_position_ids,
                                  set_recompute_ssm, swap_mixers, swap_norms)

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "resolve_source", "document_starts",
           "mixers", "packed_position_ids", "set_recompute_ssm", "swap_mixers", "swap_norms"]
