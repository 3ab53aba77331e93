"""User-facing errors: the CLI prints them as one line and exits non-zero; anything else is a bug. And the
one-line warnings a run prints when it carries on past a fault (an outage, a full disk)."""

import sys


class UserError(Exception):
    """Something the user can fix (a config value, a path, a server address); the message says what."""


def reason(exc: BaseException, limit: int = 200) -> str:
    """An exception in a few words: the OS's text for an OSError, else the first line of its message."""
    text = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0] or type(exc).__name__
    return text[:limit]


def warn(message: str) -> None:
    """One line on stderr, at once (pod logs interleave the ranks' output)."""
    print(message, file=sys.stderr, flush=True)
