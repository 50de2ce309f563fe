"""User-facing errors: one sentence that names the problem and the fix.

The CLI catches `UserError`, prints its message (no traceback unless --debug) and exits with
code 2. Raise it for anything a user can get wrong: paths, configs, recipe keys, data, adapters.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it."""

    exit_code = 2


def did_you_mean(name: str, choices) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
