"""Values checked against what they may be (type, range, finite, known name), in one place.

Every option of every verb is checked here before any expensive work, whether it came from the
command line, a config file or a keyword of the Python API: one definition (`Rule`) per value,
one line (`EdgepruneError`) per mistake, naming the value, what it takes and what it got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeprune.errors import EdgepruneError, choices_error


@dataclass(frozen=True)
class Rule:
    """What one value may be: `kind` (int, float, bool, str with `choices`, list of str), a range
    (`lo`/`hi`, open or closed ends), and whether None is allowed."""

    kind: type = int
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    @classmethod
    def of(cls, meta: dict) -> Rule:
        return cls(**{k: meta[k] for k in cls.__dataclass_fields__ if k in meta})

    def span(self) -> str:
        """The range in words: 'in [0, 1)', 'at least 1', 'more than 0'."""
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"more than {lo:g}" if self.lo_open else f"at least {lo:g}"
        if hi is not None:
            return f"less than {hi:g}" if self.hi_open else f"at most {hi:g}"
        return "a finite number"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, value: Any, rule: Rule | dict, *, as_flag: bool = True) -> Any:
    """`value` as the rule's type, or one line saying what is wrong and what it takes (naming it
    as a command-line flag, or as a file's field where `as_flag` is false)."""
    rule = rule if isinstance(rule, Rule) else Rule.of(rule)
    kind, where = rule.kind, flag(name) if as_flag else name
    if value is None and rule.optional:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise EdgepruneError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise EdgepruneError(f"{where} must be a list of names or patterns, got {value!r}")
        return list(value)
    if kind is str:
        if rule.choices and value not in rule.choices:
            raise choices_error(name, value, rule.choices)
        if not isinstance(value, str):
            raise EdgepruneError(f"{where} must be a name, got {value!r}")
        return value
    wanted = "a whole number" if kind is int else "a number"
    if isinstance(value, str) and _reads_as_number(value):  # YAML reads 5e-2 (no dot) as text
        raise EdgepruneError(f"{where} must be {wanted}, got the text {value!r} (in YAML, write 0.05 or 5.0e-2)")
    try:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not (math.isfinite(value) and float(value).is_integer()))
        ):
            raise EdgepruneError(f"{where} must be {wanted}, got {value!r}")
        value = kind(value)
    except OverflowError:
        raise EdgepruneError(f"{where} must be {rule.span()}, got a number too large to use") from None
    below = rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo)
    above = rule.hi is not None and (value >= rule.hi if rule.hi_open else value > rule.hi)
    if math.isfinite(value) and not below and not above:
        return value
    raise EdgepruneError(f"{where} must be {rule.span()}, got {value!r}")


def _reads_as_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def check_values(values: dict, rules: dict[str, Rule], *, where: str, as_flag: bool = True) -> dict:
    """Each of `values` checked by its rule (a name without one refused, naming the known ones)."""
    unknown = set(values) - set(rules)
    if unknown:
        raise EdgepruneError(f"unknown {where} setting(s) {sorted(unknown)}; known: {', '.join(sorted(rules))}")
    return {k: check_value(k, v, rules[k], as_flag=as_flag) for k, v in values.items()}


POSITIVE = Rule(int, lo=1)
POSITIVE_OR_NONE = Rule(int, lo=1, optional=True)
THREADS = Rule(int, lo=1, optional=True)  # a thread count: None leaves the library's own


def check_torch_device(name: str) -> None:
    """A torch device this machine has ('cpu', 'cuda', 'cuda:1'), or one line saying why not."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise EdgepruneError(f"unknown torch device {name!r}; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgepruneError(f"torch device {name!r}: this machine has no CUDA GPU torch can use; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise EdgepruneError(f"torch device {name!r}: edgeprune trains on cpu or cuda")
