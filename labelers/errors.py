"""The one exception for problems a user must fix: a setting out of range, a file that is not what it should be,
a model that is not there.

`distill`'s CLI prints a `UsageError` as one line and exits with status 2; every other exception is a bug (ours
or a library's) and keeps its traceback (exit 1), so it can be reported. `distill.data.DataError` (a bad record,
named by file, line and field) is a `UsageError`. It subclasses `ValueError` so that callers who catch that keep
working.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input or settings; the message says what is wrong and how to fix it, on one line."""
