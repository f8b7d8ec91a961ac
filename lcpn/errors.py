"""The one user-facing error type: its message is a sentence a user can act on.

Every module raises a subclass of ``LcpnError`` for bad input (a missing folder, an unusable model
folder, an option that cannot apply); the command line prints the message and exits with code 2.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class LcpnError(Exception):
    """A problem the user can fix; ``str(error)`` is the whole explanation."""
