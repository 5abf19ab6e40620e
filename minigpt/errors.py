"""The one exception type for mistakes a user can fix.

Library code raises `MinigptError` with a one-line message that names the file, flag or tensor at
fault. The CLIs catch it, print the message and exit with status 2; anything else is a bug and keeps
its traceback.
"""


class MinigptError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported setting."""
