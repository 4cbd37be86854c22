"""The one exception type for bad user input.

The CLI turns :class:`InputError` into a single line on stderr and exit code 2;
library callers can catch it like any ``ValueError``.
"""


class InputError(ValueError):
    """Raised when user-supplied data is missing, unreadable or inconsistent."""
