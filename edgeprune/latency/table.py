"""Latency tables: LayerConfig key -> measurement, with the device fingerprint and protocol.

JSON, written atomically (a killed write leaves the previous file intact), loadable by anyone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.runs import write_text

SCHEMA = 1
# fingerprint fields that make measurements incomparable when they differ
FINGERPRINT_KEYS = ("runtime", "version", "cpu", "gpu", "threads", "precision", "device", "providers", "timing")
# tables written before the protocol named its timing timed the Python call
LEGACY = {"timing": "python-call"}


def calibration_key(counts) -> str:
    """How a whole-model calibration point is keyed in a table's meta: its keep-counts, comma-joined."""
    return ",".join(str(int(c)) for c in counts)


@dataclass
class LatencyTable:
    device: str
    fingerprint: dict
    protocol: dict
    step: int | None = None
    model: str | None = None
    input_shape: list[int] | None = None
    entries: dict[str, dict] = field(default_factory=dict)  # key -> Measurement.to_dict()
    calibration: dict = field(default_factory=lambda: {"a": 1.0, "b": 0.0, "n": 0})
    meta: dict = field(default_factory=dict)

    def check_input(self, input_shape, path, advice: str) -> None:
        """A table holds one input size: refuse another in one line that says so (not as missing
        layer configurations, which is what it would look like)."""
        if self.input_shape and list(self.input_shape) != list(input_shape):
            raise EdgepruneError(
                f"{path} was profiled at input {list(self.input_shape)}, the model takes {list(input_shape)}: a table "
                f"holds one input size; profile the model at its own: {advice}"
            )

    def other_model(self, model_id: str, signature: str) -> str | None:
        """Why this table's calibration line is another model's (None where it is this one's): the
        line is fitted on whole-model measurements, and another model (or another head or input
        size of it) adds up from its units differently."""
        fitted = self.meta.get("calibration_signature")
        if fitted is not None:
            return None if fitted == signature else f"its calibration was fitted on other layers ({self.model}'s)"
        if self.model not in (None, model_id):
            return f"it was profiled for {self.model}, not {model_id}"
        return None

    def ms(self, key: str) -> float:
        return self.entries[key]["median_ms"]

    @property
    def unit_copies(self) -> int:
        """1: entries are isolated single-unit models (each pays the per-call overhead); K > 1:
        entries are in-graph costs, the per-copy difference between K copies and one."""
        return int(self.meta.get("unit_copies", 1))

    @property
    def overhead_ms(self) -> float:
        """What each entry pays besides the unit itself (subtracted before summing)."""
        return 0.0 if self.unit_copies > 1 else float(self.meta.get("unit_overhead_ms", 0.0))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "device": self.device,
            "fingerprint": self.fingerprint,
            "protocol": self.protocol,
            "step": self.step,
            "model": self.model,
            "input_shape": self.input_shape,
            "calibration": self.calibration,
            "meta": self.meta,
            "entries": self.entries,
        }

    def save(self, path: str | os.PathLike) -> Path:
        d = self.to_dict()
        entries = d.pop("entries")
        head = json.dumps(d, indent=2)[:-2]  # without the closing brace
        body = ",\n".join(
            f"    {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in sorted(entries.items())
        )
        return write_text(path, f'{head},\n  "entries": {{\n{body}\n  }}\n}}\n')

    @classmethod
    def load(cls, path: str | os.PathLike, *, fingerprint: dict | None = None, strict: bool = False) -> LatencyTable:
        """Read a table; compare its fingerprint with `fingerprint` (warn, or refuse when `strict`)."""
        path = Path(path)
        if not path.is_file():
            raise EdgepruneError(f"latency table {path} does not exist; create it with `edgeprune profile`")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict) or "entries" not in d:
                raise ValueError("no entries")
            if d.get("schema", 0) > SCHEMA:
                raise EdgepruneError(f"latency table {path} has schema {d['schema']}; this edgeprune reads {SCHEMA}")
            table = cls(
                d["device"],
                d["fingerprint"],
                d["protocol"],
                d.get("step"),
                d.get("model"),
                d.get("input_shape"),
                d["entries"],
                d.get("calibration") or {"a": 1.0, "b": 0.0, "n": 0},
                d.get("meta", {}),
            )
        except EdgepruneError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise EdgepruneError(
                f"latency table {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:80]}); profile again"
            ) from None
        if fingerprint is not None:
            diff = fingerprint_diff(table.fingerprint, fingerprint)
            if diff:
                msg = f"latency table {path} was profiled on another device setup ({diff})"
                if strict:
                    raise EdgepruneError(msg + "; profile this device, or drop --strict to use it anyway")
                warnings.warn(msg + "; predictions may be off", stacklevel=2)
        return table


def comparable(fingerprint: dict) -> dict:
    """The fields that make two measurements comparable, a table of before a field existed read
    with what it measured then (LEGACY)."""
    return {k: fingerprint.get(k, LEGACY.get(k)) for k in FINGERPRINT_KEYS}


def fingerprint_diff(a: dict, b: dict) -> str:
    """The fields that differ, as 'field: A != B' (empty when they match)."""
    a, b = comparable(a), comparable(b)
    return "; ".join(f"{k}: {a[k]} != {b[k]}" for k in FINGERPRINT_KEYS if a[k] != b[k])


def setup_name(fingerprint: dict) -> str:
    """A folder name for one device setup's tables: its processor, slugged, and a short hash of the
    fingerprint's comparable fields (FINGERPRINT_KEYS: two setups of one processor, e.g. another
    runtime version, stay apart). A field at its LEGACY value is left out of the hash, so a setup's
    folder keeps the name it had before the field existed."""
    what = fingerprint.get("gpu") or fingerprint.get("cpu") or fingerprint.get("runtime") or "device"
    slug = re.sub(r"[^a-z0-9]+", "-", str(what).lower()).strip("-")[:40] or "device"
    fields = {k: v for k, v in comparable(fingerprint).items() if k not in LEGACY or v != LEGACY[k]}
    whole = json.dumps(fields, sort_keys=True, default=str)
    return f"{slug}-{hashlib.sha256(whole.encode()).hexdigest()[:6]}"


def find_table(
    device, model_id: str, given: str | os.PathLike | None = None, *, writing: bool = False, log=None
) -> Path:
    """The one place a table is chosen: `given` where the user named one, else the device profile's
    table of `model_id` for this setup (`default_table`; the device's fingerprint is asked only
    where it decides). A `given` table of another device setup gives way to this setup's own table
    of the same device profile and model beside it (a config written on one machine names that
    machine's table; on this one, its own predicts better): `log` says so."""
    if not given:
        return default_table(device.name, model_id, device.fingerprint, writing=writing)
    given = Path(given)
    if writing or device is None or not given.is_file():
        return given
    try:
        theirs = json.loads(given.read_text())
        if theirs.get("device") != device.name or theirs.get("model") not in (None, model_id):
            return given  # another profile's or model's table: the user chose it, prune says what it is
    except (OSError, ValueError, AttributeError):
        return given  # LatencyTable.load says what is wrong with it
    own = default_table(device.name, model_id, device.fingerprint, root=given.parent.parent)
    if own != given and own.is_file() and own.parent.parent == given.parent:
        if log is not None:
            log(f"table: {own}, this device setup's own, instead of {given} (profiled on another setup)")
        return own
    return given


def default_table(
    device_name: str,
    model_id: str,
    fingerprint: dict | Callable[[], dict] | None = None,
    *,
    root: str | os.PathLike = "latency_tables",
    writing: bool = False,
) -> Path:
    """Where the table for `model_id` on this device setup is (`writing`: goes).

    ROOT/DEVICE/MODEL.json is the device profile's table. Where that one was profiled on another
    setup (another CPU, runtime version, thread count: `fingerprint` differs), this setup's own
    table lives in ROOT/DEVICE/SETUP/MODEL.json (`setup_name`), so that profiling a second machine
    neither overwrites the first one's table nor is refused for it, and prune, predict and run use
    it when it exists. Without one, a setup gets the profile's (prune warns that it is another's).
    `fingerprint` may be a function: it is called only where the profile's table exists (a device
    reached through an agent is asked only then), and where it fails the profile's table is it."""
    base = Path(root) / device_name / f"{model_id}.json"
    if fingerprint is None or not base.is_file():
        return base
    try:
        theirs = json.loads(base.read_text())["fingerprint"]
        if not isinstance(theirs, dict):
            return base
    except (OSError, ValueError, KeyError, TypeError):
        return base  # LatencyTable.load says what is wrong with it
    if callable(fingerprint):
        try:
            fingerprint = fingerprint()
        except Exception:  # the device is out of reach or its runtime missing: whoever measures says so
            return base
    if not fingerprint_diff(theirs, fingerprint):
        return base
    own = base.parent / setup_name(fingerprint) / base.name
    return own if writing or own.is_file() else base
