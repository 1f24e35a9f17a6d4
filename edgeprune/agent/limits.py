"""What one agent accepts and keeps: `edgeprune agent serve` options, reported by `GET /v1/info`.

Every limit bounds something an unlucky or hostile client could otherwise grow without end: memory
(body size, input elements), device time (items per request, items queued, time per
measurement) and the job table (finished jobs kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.checks import Rule


@dataclass(frozen=True)
class Limits:
    """What one agent accepts; `edgeprune agent serve` options, reported by `GET /v1/info`."""

    max_bytes: int = 64 << 20  # one request body
    max_items: int = 1000  # models in one request
    max_queued: int = 5000  # items waiting over all jobs
    max_input_elements: int = 1 << 26  # one input tensor (256 MiB as float32)
    max_uploads: int = 4  # requests received and vetted at once (each holds its body in memory)
    max_connections: int = 256  # open connections (beyond: 503), token or not
    keep_jobs: int = 500  # finished jobs kept for polling...
    keep_s: float = 3600.0  # ...for at most this long
    job_timeout_s: float = 300.0  # one measurement

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# `agent serve`'s options, by their flag names
RULES = {
    "max_mb": Rule(int, lo=1),
    "max_items": Rule(int, lo=1),
    "max_queued": Rule(int, lo=1),
    "max_input_elements": Rule(int, lo=1),
    "max_uploads": Rule(int, lo=1),
    "max_connections": Rule(int, lo=1),
    "keep_jobs": Rule(int, lo=1),
    "keep_hours": Rule(float, lo=0, lo_open=True),
    "job_timeout": Rule(float, lo=0, lo_open=True),
}
DEFAULTS = Limits()
OPTIONS = {
    "max_mb": DEFAULTS.max_bytes >> 20,
    "max_items": DEFAULTS.max_items,
    "max_queued": DEFAULTS.max_queued,
    "max_input_elements": DEFAULTS.max_input_elements,
    "max_uploads": DEFAULTS.max_uploads,
    "max_connections": DEFAULTS.max_connections,
    "keep_jobs": DEFAULTS.keep_jobs,
    "keep_hours": DEFAULTS.keep_s / 3600,
    "job_timeout": DEFAULTS.job_timeout_s,
}


def from_options(**options) -> Limits:
    """Limits from `agent serve`'s options (any left out keep their defaults), each checked."""
    from edgeprune.checks import check_values
    from edgeprune.errors import EdgepruneError

    o = check_values({**OPTIONS, **options}, RULES, where="agent serve")
    if o["max_queued"] < o["max_items"]:
        raise EdgepruneError(
            f"--max-queued ({o['max_queued']}) must be at least --max-items ({o['max_items']}): a full request must fit"
        )
    return Limits(
        max_bytes=o["max_mb"] << 20,
        max_items=o["max_items"],
        max_queued=o["max_queued"],
        max_input_elements=o["max_input_elements"],
        max_uploads=o["max_uploads"],
        max_connections=o["max_connections"],
        keep_jobs=o["keep_jobs"],
        keep_s=o["keep_hours"] * 3600,
        job_timeout_s=o["job_timeout"],
    )
