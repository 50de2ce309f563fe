"""The transformers versions mamba-ft is tested against, read from the installed metadata.

mamba-ft interposes on transformers internals (the Mamba mixer's call signature, the
linear-attention cache API), so a release outside the tested range can break it in ways no
type check sees. pyproject.toml holds the one range; this module reads it back so that error
messages and the load-time check name the same numbers.
"""

from __future__ import annotations

import functools
import warnings
from importlib import metadata

import transformers
from packaging.requirements import Requirement
from packaging.version import Version


@functools.cache
def transformers_requirement() -> Requirement:
    for line in metadata.requires("mamba-ft") or ():
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is None:
            return requirement
    raise RuntimeError("mamba-ft's package metadata names no transformers requirement; "
                       "reinstall mamba-ft (pip install -e .).")


SUPPORTED_TRANSFORMERS = str(transformers_requirement().specifier)


def warn_if_untested_transformers() -> None:
    """Warn once when the installed transformers lies outside the tested range."""
    installed = Version(transformers.__version__)
    if not transformers_requirement().specifier.contains(installed, prereleases=True):
        warnings.warn(
            f"transformers {installed} is outside the range mamba-ft is tested with "
            f"({SUPPORTED_TRANSFORMERS}); its Mamba internals may have moved. Install a tested "
            f"version: pip install 'transformers{SUPPORTED_TRANSFORMERS}'.", stacklevel=2)
