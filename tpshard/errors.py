"""The one exception type users see: its message is a single line that says what is wrong and what to do."""


class TpshardError(Exception):
    """Bad input or a failed precondition, reported as one line on stderr with exit code 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line and `limit` characters (torch's carry C++ stack
    traces; a forged file can make one megabytes long); "" when it has none."""
    return (str(e).strip().splitlines() or [""])[0][:limit]
