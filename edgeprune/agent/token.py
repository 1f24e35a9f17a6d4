"""The agent's bearer token: made on first start, kept owner-only, refused where it is weak or exposed."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from edgeprune.errors import EdgepruneError

MIN_CHARS = 32  # secrets.token_urlsafe(32) gives 43; a shorter token is guessable in reach of a lab network


def _checked(path: Path) -> str | None:
    """The token stored at `path`, None where there is none yet; one line where it cannot be trusted."""
    if path.is_dir():
        raise EdgepruneError(f"token file {path} is a folder; give a file path with --token-file")
    if not path.exists():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise EdgepruneError(
            f"token file {path} is readable by other users (mode {mode:04o}); run `chmod 600 {path}` and start again"
        )
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgepruneError(f"cannot read the token file {path} ({type(e).__name__}); fix or delete it") from None
    if not token:
        return None
    if len(token) < MIN_CHARS:
        raise EdgepruneError(
            f"the token in {path} has {len(token)} characters, under the {MIN_CHARS} an agent needs; "
            "delete the file and a strong one is made on the next start"
        )
    return token


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The agent's token from `path`, created (owner-only) on first start; (token, created)."""
    token = _checked(path)
    if token is not None:
        return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(MIN_CHARS)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)
    return token, True
