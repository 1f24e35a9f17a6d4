"""What the agent and its clients agree on: the API version, the version header, and when a
client and an agent can talk. Both sides import this; the client never imports the server (and
with it FastAPI)."""

from __future__ import annotations

from edgeprune import __version__

API = "v1"
VERSION_HEADER = "x-edgeprune-version"


def compatible(client: str, agent: str = __version__) -> bool:
    """Same major.minor: the wire format and protocol semantics match."""
    return client.split(".")[:2] == agent.split(".")[:2]
