"""User-facing errors.

An ``EdgepruneError`` carries one line that says what was wrong and what to do; the CLI prints
it without a traceback. Anything else escaping the library is a bug.
"""


class EdgepruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def choices_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> EdgepruneError:
    """The standard 'unknown X' error, naming the valid choices."""
    return EdgepruneError(f"unknown {kind} {name!r}; choose one of: {', '.join(valid)}")
