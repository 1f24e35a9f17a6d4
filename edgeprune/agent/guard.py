"""Who may ask: the bearer token, checked in constant time, and a back-off for addresses that guess.

Every failed attempt is logged with the client's address (never what it sent). After `free`
failures in a row an address waits before its next attempt is even checked, twice as long after
each further failure (up to `max_wait_s`); a correct token clears its record.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("edgeprune.agent")


@dataclass
class Failures:
    count: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


class AuthGuard:
    def __init__(self, token: str, *, free: int = 5, max_wait_s: float = 300.0, remember: int = 10_000) -> None:
        self.token = token.encode()
        self.free, self.max_wait_s, self.remember = free, max_wait_s, remember
        self.failures: dict[str, Failures] = {}
        self.lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds `client` must still wait before its token is checked again (0: go ahead)."""
        with self.lock:
            f = self.failures.get(client)
            return max(0.0, f.blocked_until - time.monotonic()) if f else 0.0

    def check(self, client: str, authorization: str) -> bool:
        """Whether the `Authorization` header carries the token; a failure is logged and counted."""
        given = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        ok = hmac.compare_digest(given.encode(), self.token)
        with self.lock:
            if ok:
                self.failures.pop(client, None)
                return True
            now = time.monotonic()
            f = self.failures.setdefault(client, Failures())
            f.count, f.last = f.count + 1, now
            if f.count >= self.free:
                f.blocked_until = now + min(self.max_wait_s, 2.0 ** (f.count - self.free))
            self._forget_oldest()
            count = f.count
        log.warning(
            "refused %s: %s (%d failed attempt%s in a row)",
            client,
            "no token" if not given else "wrong token",
            count,
            "" if count == 1 else "s",
        )
        return False

    def _forget_oldest(self) -> None:
        """Bounded memory: the addresses idle longest are forgotten first."""
        if len(self.failures) > self.remember:
            for client, _ in sorted(self.failures.items(), key=lambda kv: kv[1].last)[: len(self.failures) // 10]:
                del self.failures[client]
