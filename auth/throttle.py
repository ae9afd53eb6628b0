"""Login throttling: password guesses get slower the more of them fail.

Failures are counted per user name and per client address. Past a few free ones, each
further failure locks that key for a delay that doubles (1 s, 2 s, 4 s, ...) up to a cap,
and a locked key is answered 429 TOO_MANY_ATTEMPTS with Retry-After, before any hashing. A
key's count is forgotten after a quiet period, and a success clears the user's and the
address's counts. The caps are short, so a flood aimed at a user name keeps its real owner
out for half a minute at most (and not at all while the owner's credentials are in the
verified-credentials cache, or with a session).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

FREE_USER_FAILURES = 5  # failures per user name before any delay
FREE_ADDRESS_FAILURES = 20  # per client address (several users may share one, behind NAT)
FIRST_DELAY = 1.0  # seconds, doubled with every further failure
USER_CAP = 30.0  # longest lock of a user name (its owner may be the one waiting)
ADDRESS_CAP = 300.0  # longest lock of a client address
FORGET_AFTER = 900.0  # seconds without a failure after which a key starts afresh
MAX_KEYS = 10_000  # per kind: memory stays bounded whatever a flood sends


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0


class Locked(Exception):
    """A key is locked; `retry_after` seconds until the next attempt is heard."""

    def __init__(self, kind: str, retry_after: float):
        super().__init__(kind)
        self.kind = kind  # "user" or "address"
        self.retry_after = retry_after


class _Keys:
    def __init__(self, free: int, cap: float):
        self.free = free
        self.cap = cap
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _get(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now - record.last_failure > FORGET_AFTER:
            del self._records[key]
            return None
        return record

    def wait(self, key: str, now: float) -> float:
        record = self._get(key, now)
        return max(0.0, record.locked_until - now) if record else 0.0

    def fail(self, key: str, now: float) -> None:
        record = self._get(key, now) or _Record()
        record.failures += 1
        record.last_failure = now
        over = record.failures - self.free
        if over > 0:
            record.locked_until = now + min(self.cap, FIRST_DELAY * 2 ** min(over - 1, 30))
        self._records[key] = record
        self._records.move_to_end(key)
        while len(self._records) > MAX_KEYS:
            self._records.popitem(last=False)

    def clear(self, key: str) -> None:
        self._records.pop(key, None)


class LoginThrottle:
    """Used on the event loop only (no locking)."""

    def __init__(self) -> None:
        self.users = _Keys(FREE_USER_FAILURES, USER_CAP)
        self.addresses = _Keys(FREE_ADDRESS_FAILURES, ADDRESS_CAP)

    def check(self, username: str, address: str | None) -> None:
        """Raise Locked if this attempt must not be heard yet."""
        now = time.monotonic()
        waits = [("user", self.users.wait(username, now))]
        if address:
            waits.append(("address", self.addresses.wait(address, now)))
        kind, wait = max(waits, key=lambda w: w[1])
        if wait > 0:
            raise Locked(kind, math.ceil(wait))

    def failed(self, username: str, address: str | None) -> None:
        now = time.monotonic()
        self.users.fail(username, now)
        if address:
            self.addresses.fail(address, now)

    def succeeded(self, username: str, address: str | None) -> None:
        self.users.clear(username)
        if address:
            self.addresses.clear(address)
