"""The one base class of errors a user can cause and fix.

Every error that comes from the user's config, paths, data or environment (not from a bug)
derives from `UserError`; the CLI prints it as one `bagel-titan: error: ...` line and exits
with code 2, never with a traceback. Its message names the key, file or sample and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message says what is wrong and how to fix it."""

    def __str__(self) -> str:  # subclasses of KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
