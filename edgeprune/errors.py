"""User-facing errors.

An ``EdgepruneError`` carries one line that says what was wrong and what to do; the CLI prints
it without a traceback. Anything else escaping the library is a bug.
"""


class EdgepruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def choices_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> EdgepruneError:
    """The standard 'unknown X' error, naming the valid choices."""
    return EdgepruneError(f"unknown {kind} {name!r}; choose one of: {', '.join(valid)}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that keeps what it did: `kept` says what (the CLI prints it with the
    command that resumes, and exits 130). A KeyboardInterrupt still, for Python callers."""

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept
