"""What a request may carry, read strictly: every mistake is a 400 with one line, before any work.

Numbers are whole numbers on the wire, not floats, strings or booleans that happen to convert;
JSON's non-standard `NaN`/`Infinity` are refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os

from edgeprune.errors import EdgepruneError
from edgeprune.latency.measurement import Protocol


class BadRequest(Exception):
    """Refused with HTTP `status` and this one-line `detail`; picklable, so the process that vets
    requests can raise it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def too_large(size: int, limit: int) -> str:
    return f"request of {size} bytes is over the agent's limit of {limit} (agent serve --max-mb)"


def _no_constant(name: str):
    raise BadRequest(400, f"request body has {name}, which is not JSON; send finite numbers")


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadRequest(400, "request body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "request body must be a JSON object")
    return data


def whole(value, name: str, lo: int = 0) -> int:
    if type(value) is not int or value < lo:  # not bool, not 1.0, not "1"
        raise BadRequest(400, f"{name} must be a whole number >= {lo}, got {json.dumps(value)[:40]}")
    return value


def parse_shape(value, max_elements: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise BadRequest(400, f"input_shape must be a non-empty list of sizes, got {json.dumps(value)[:60]}")
    shape = [whole(v, "each input_shape size", lo=1) for v in value]
    elements = math.prod(shape)
    if elements > max_elements:
        raise BadRequest(
            400,
            f"input_shape {shape} has {elements:,} elements, over the agent's limit of {max_elements:,} "
            "(agent serve --max-input-elements)",
        )
    return shape


def parse_fresh(data: dict) -> bool:
    fresh = data.get("fresh", False)
    if not isinstance(fresh, bool):
        raise BadRequest(400, "'fresh' must be true or false")
    return fresh


def parse_protocol(data: dict, default: dict) -> dict:
    """The client's protocol, checked here as the worker would (and its CPUs against this device's)."""
    given = data.get("protocol")
    if given is not None and not isinstance(given, dict):
        raise BadRequest(400, f"bad protocol: must be an object of fields, got {json.dumps(given)[:60]}")
    try:
        protocol = Protocol.from_dict(given or default)
    except (EdgepruneError, TypeError, ValueError) as e:
        raise BadRequest(400, f"bad protocol: {e}") from None
    if protocol.pin_cpus and not set(protocol.pin_cpus) <= os.sched_getaffinity(0):
        raise BadRequest(
            400, f"bad protocol: pin_cpus {list(protocol.pin_cpus)} are not all usable CPUs of this device"
        )
    return protocol.to_dict()


def decode_model(item: dict) -> bytes:
    try:
        return base64.b64decode(item["model"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise BadRequest(400, "each item needs 'model' (base64 ONNX bytes) and 'input_shape' (sizes)") from None


def parse_items(data: dict, max_items: int) -> list:
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise BadRequest(400, "'items' must be a non-empty list of {model, input_shape} (or {same_as, input_shape})")
    if len(items) > max_items:
        raise BadRequest(
            400, f"{len(items)} items in one request, over the agent's limit of {max_items}; send them as several jobs"
        )
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest(400, f"each item must be an object, got {json.dumps(item)[:40]}")
    return items
