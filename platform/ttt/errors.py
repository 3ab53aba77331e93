"""User-facing errors: the CLI prints them as one line and exits non-zero; anything else is a bug."""


class UserError(Exception):
    """Something the user can fix (a config value, a path, a server address); the message says what."""
