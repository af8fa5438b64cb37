"""Errors a user can act on. Stage entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input, bad params or a bad environment: the message says what, where and how to fix."""


class ConfigError(UserError):
    """A params.yaml value is unknown, mistyped or impossible. ``key`` is its dotted name."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` in front of its key (used when nesting sections)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err``'s message (its type's name when it has none), cut to ``limit``
    characters: what a one-line error quotes of a library's multi-line one."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
