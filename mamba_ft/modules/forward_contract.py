"""The keyword contract a swapped mixer's forward keeps with transformers' blocks.

transformers passes the cache as `cache` (5.24 and later) or `cache_params` (5.23); any other
keyword must fail loudly, not vanish into **kwargs (a swallowed cache once made every decoding
step start from an empty state); a cache that records past states for rollback (assisted and
speculative decoding) is refused, because the mixers do not write that history. Both mixers
keep the contract through these helpers.

transformers' `MambaBlock` calls its mixer with the cache and the mask only, but `Mamba2Block`
(and the hybrids' blocks, Zamba's Mamba-1 ones included) hands the mixer every keyword the
model's forward got (`TransformersKwargs`). Some of those only ask the model for outputs or normalise its loss and
mean nothing to a mixer; making them errors would break `model(ids, output_hidden_states=True)`
and trainers that pass `num_items_in_batch`. They are named here, one by one, and ignored.
The others (`seq_idx`, `cu_seq_lens_q`, `position_ids`, ... : packing information the mixer does
not read) and anything new stay errors.
"""

from __future__ import annotations

import transformers

from mamba_ft.compat import SUPPORTED_TRANSFORMERS


def one_cache(owner: str, cache, cache_params):
    """The cache, whichever name it came under; both at once is an error."""
    if cache is not None and cache_params is not None:
        raise TypeError(f"{owner}.forward got both `cache` and `cache_params`; pass the cache "
                        f"once.")
    return cache if cache is not None else cache_params


# Keywords of transformers' TransformersKwargs that request outputs or scale the loss: nothing a
# mixer computes depends on them.
OUTPUT_ONLY_KEYWORDS = frozenset({"output_hidden_states", "output_attentions",
                                  "output_router_logits", "num_items_in_batch"})


def refuse_unknown_keywords(owner: str, unexpected: dict, ignorable=frozenset()) -> None:
    """TypeError naming every keyword in `unexpected` outside `ignorable`."""
    unexpected = {k: v for k, v in unexpected.items() if k not in ignorable}
    if unexpected:
        raise TypeError(
            f"{owner}.forward got keyword(s) it does not understand: "
            f"{', '.join(sorted(unexpected))} (transformers {transformers.__version__}). "
            f"mamba-ft supports transformers {SUPPORTED_TRANSFORMERS}; install a version in "
            f"that range, or teach the mixer the new keyword.")


def refuse_recording_cache(cache, layer_idx: int) -> None:
    if cache is not None and cache.is_recording_past(layer_idx):
        raise NotImplementedError(
            "mamba-ft's mixer does not record past states for cache rollback "
            "(assisted or speculative decoding); use plain generate, or merge the adapter "
            "and decode with plain transformers.")
