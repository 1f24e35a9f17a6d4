"""Base checkpoints shipped with edgeprune (trained with `edgeprune train`; see README.md here)."""

from __future__ import annotations

from pathlib import Path

from edgeprune.errors import EdgepruneError

ZOO_DIR = Path(__file__).resolve().parent


def shipped() -> list[str]:
    """Names of the shipped checkpoints, as MODEL-DATASET."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.pt"))


def shipped_checkpoint(model: str, dataset: str) -> Path:
    """Path of the shipped checkpoint of `model` trained on `dataset` (it may not exist yet)."""
    return ZOO_DIR / f"{model}-{dataset}.pt"


def resolve_weights(spec: str) -> Path:
    """A checkpoint path, or `zoo:MODEL-DATASET` for a shipped one."""
    if spec.startswith("zoo:"):
        path = ZOO_DIR / f"{spec[4:]}.pt"
        if not path.is_file():
            raise EdgepruneError(f"no shipped checkpoint {spec!r}; shipped: {', '.join(shipped()) or 'none'}")
        return path
    return Path(spec)
