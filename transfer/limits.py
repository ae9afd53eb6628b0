"""The limits an operator sets on transfers: how many run at once (per host, per user),
and how slow a body may be (idle seconds, a minimum rate over a window) before its
connection is cut, so that a stalled client cannot hold a VDI's lock or read lease for
as long as it likes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from common.errors import ApiError

RETRY_AFTER = 5  # seconds a refused client is told to wait


class Stalled(ConnectionResetError):
    """The client sent or took no byte for too long, or too few: its transfer is cut as if
    it had gone away (the task fails, or a resumable upload is suspended)."""


@dataclass(frozen=True)
class Pacing:
    """Idle and minimum-rate limits of body transfers; 0 turns one off."""

    idle_timeout: float = 0.0  # seconds without a byte
    min_rate: float = 0.0  # bytes per second, on average over each window
    rate_window: float = 60.0  # seconds


class Pace:
    """One body's pace, checked as its bytes move (`moved`) and while it waits for the next
    (`idle_left`)."""

    def __init__(self, limits: Pacing, what: str):
        self.limits = limits
        self.what = what  # "the upload", "the download": for messages
        now = time.monotonic()
        self.last = now  # when a byte last moved
        self.window_start, self.window_bytes = now, 0

    def moved(self, n: int) -> None:
        """`n` more bytes moved now; Stalled if the window just ended below the rate."""
        now = time.monotonic()
        if n:
            self.last = now
        self.window_bytes += n
        self.check(now)

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        limits = self.limits
        if limits.idle_timeout and now - self.last >= limits.idle_timeout:
            raise Stalled(f"{self.what} moved no byte for {limits.idle_timeout:g} s")
        elapsed = now - self.window_start
        if limits.min_rate and elapsed >= limits.rate_window:
            rate = self.window_bytes / elapsed
            if rate < limits.min_rate:
                raise Stalled(
                    f"{self.what} moved {rate:.0f} bytes/s over {elapsed:.0f} s, "
                    f"under the minimum of {limits.min_rate:.0f}"
                )
            self.window_start, self.window_bytes = now, 0

    def wait_left(self) -> float | None:
        """Seconds a wait for the next byte may last before a limit is crossed; None: no
        limit applies."""
        now = time.monotonic()
        limits, bounds = self.limits, []
        if limits.idle_timeout:
            bounds.append(self.last + limits.idle_timeout - now)
        if limits.min_rate:
            bounds.append(self.window_start + limits.rate_window - now)
        return max(0.0, min(bounds)) + 0.01 if bounds else None


class TransferSlots:
    """Admission of transfers on this host: at most `per_host` at once, and `per_user` for
    any one user (0: no limit). Refused before the body's first byte and before a 100
    Continue, with Retry-After."""

    def __init__(self, per_host: int = 0, per_user: int = 0):
        self.per_host = per_host
        self.per_user = per_user
        self.running = 0
        self.by_user: dict[str, int] = {}

    @contextlib.contextmanager
    def take(self, user: str | None) -> Iterator[None]:
        if self.per_host and self.running >= self.per_host:
            raise ApiError(
                "TOO_MANY_TRANSFERS",
                f"this host runs {self.running} transfers, its limit: try again later",
                self.per_host,
                status=503,
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        key = user or ""
        mine = self.by_user.get(key, 0)
        if self.per_user and mine >= self.per_user:
            raise ApiError(
                "TOO_MANY_TRANSFERS",
                f"you run {mine} transfers on this host, the limit per user: try again later",
                self.per_user,
                status=429,
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        self.running += 1
        self.by_user[key] = mine + 1
        try:
            yield
        finally:
            self.running -= 1
            left = self.by_user[key] - 1
            if left:
                self.by_user[key] = left
            else:
                del self.by_user[key]
