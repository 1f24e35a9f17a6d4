import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fmnist():
    from edgeprune.data import load_dataset

    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def digits():
    from edgeprune.data import load_dataset

    return load_dataset("digits")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `edgeprune` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "edgeprune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def cli():
    return run_cli
