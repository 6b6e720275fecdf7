"""User-facing errors.

A `UserError` is bad input the user can fix (a path, a config value, a malformed row). The CLI
prints its message as one line and exits with status 2, no traceback; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""
