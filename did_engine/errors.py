"""The one exception family for mistakes in what a user gave us.

A ``UserError`` means an argument, a config value or a file supplied by the user is wrong;
its message says which and why, in one line. The command-line entry points print it as
``did-engine: error: <message>`` and exit with status 2. Every other exception (including a
plain ``ValueError`` raised by a kernel's argument check deep inside the model, which would
be a bug of ours) keeps its traceback.

``UserError`` subclasses ``ValueError``, so code that already catches ``ValueError`` around
our API keeps working.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Something the user supplied is wrong: printed by the CLI as one line, exit status 2."""
