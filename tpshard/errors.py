"""The one exception type users see: its message is a single line that says what is wrong and what to do."""


class TpshardError(Exception):
    """Bad input or a failed precondition, reported as one line on stderr with exit code 2."""
