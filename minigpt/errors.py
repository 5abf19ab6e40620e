"""The one exception type for mistakes a user can fix.

Library code raises `MinigptError` with a one-line message that names the file, flag or tensor at
fault. The CLIs catch it, print the message and exit with status 2; anything else is a bug and keeps
its traceback.
"""


class MinigptError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported setting."""


def reason(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): wrapped libraries
    raise multi-line errors, and a user error must stay one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
