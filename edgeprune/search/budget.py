"""A latency budget: milliseconds, or a share of the dense model's measured latency.

"2.5", "2.5ms" and 2.5 are 2.5 milliseconds; "50%" is half of what the dense model measures on
the device. A share is a ratio, and stays one: prune and validate hold it against the dense model
measured beside the candidates, so a device that drifts moves both sides alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeprune.errors import EdgepruneError


@dataclass(frozen=True)
class Budget:
    value: float  # milliseconds, or the share of dense (0.5 for "50%")
    relative: bool = False

    @classmethod
    def parse(cls, text: str | float | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        s = str(text).strip().lower()
        relative = s.endswith("%")
        try:
            number = float(s[:-1] if relative else s.removesuffix("ms").strip())
        except ValueError:
            raise EdgepruneError(f"budget {text!r} is neither milliseconds (2.5) nor a share of dense (50%)") from None
        if not math.isfinite(number) or number <= 0:
            raise EdgepruneError(f"budget must be a positive, finite number of ms or a share of dense, got {text!r}")
        if relative and number >= 100:
            raise EdgepruneError(f"budget {text!r} is not below the dense model's latency: give a share under 100%")
        return cls(number / 100 if relative else number, relative)

    def ms(self, dense_ms: float) -> float:
        """The budget in milliseconds, given the dense model's latency measured now."""
        return self.value * dense_ms if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"
