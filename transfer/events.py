"""The event log behind XenAPI's event.from: which record changed, in what order.

Every change of a record a XenAPI client can watch (a task, a VDI) appends a row (class,
uuid, operation; the ref too for a deletion, as the record is gone) to the `events` table of
the shared database, so a watcher on any host of a pool sees a change made on any other. A
token is the id of the last row a watcher has seen. Rows must become visible in id order, or
a watcher could step over a row committed late: SQLite has one writer at a time, and on
PostgreSQL the insert takes a transaction-scoped advisory lock first, so ids are drawn and
committed in the same order.

Waiters on this host wake at once when this host appends; changes made by other hosts are
noticed by one poller that looks at the newest id every POLL_INTERVAL while anyone waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from common.db import Executor
from common.errors import ApiError
from transfer.db import Database, Row

POLL_INTERVAL = 0.2  # seconds: how soon a change made on another host of a pool is seen
KEEP_EVENTS = 3600.0  # seconds a change stays in the log; older tokens get EVENTS_LOST
COMMIT_DELAY = 0.01  # seconds after which an event recorded in a transaction is committed
MAX_BATCH = 5000  # rows one event.from answer covers; the rest come with the next call
_ORDER_LOCK = 7230952  # pg_advisory_xact_lock key that orders event ids with commits


class EventLog:
    """Append changes; wait for changes after a token."""

    def __init__(self, db: Database):
        self.db = db
        self._changed = asyncio.Event()
        self._waiting = 0  # calls waiting in `wait`
        self._poller: asyncio.Task | None = None

    async def record(
        self,
        cls: str,
        uuid: str,
        operation: str = "mod",
        *,
        ref: str | None = None,
        db: Executor | None = None,
    ) -> None:
        """Note that the `cls` record `uuid` was added, modified or deleted (`operation`:
        add | mod | del; a deletion gives the `ref` the record had). `db`: the transaction
        that makes the change, so the change and its event commit together; without one, a
        transaction of its own."""
        if db is None:
            async with self.db.transaction() as tx:
                await self._append(tx, cls, uuid, operation, ref)
        else:
            await self._append(db, cls, uuid, operation, ref)
            # Its transaction commits soon after: wake the waiters again once it has.
            asyncio.get_running_loop().call_later(COMMIT_DELAY, self.wake)
        self.wake()

    async def _append(
        self, tx: Executor, cls: str, uuid: str, operation: str, ref: str | None
    ) -> None:
        if self.db.dialect == "postgresql":
            await tx.execute("SELECT pg_advisory_xact_lock(?)", _ORDER_LOCK)
        await tx.execute(
            "INSERT INTO events (class, uuid, ref, operation, created) VALUES (?, ?, ?, ?, ?)",
            cls,
            uuid,
            ref,
            operation,
            time.time(),
        )

    def wake(self) -> None:
        """Wake this host's waiters (they look at the log again)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def latest(self) -> int:
        """The id of the newest change (the pruning mark, when everything was pruned)."""
        row = await self.db.fetchone("SELECT MAX(id) AS id FROM events")
        if row and row["id"] is not None:
            return int(row["id"])
        return await self._pruned_to()

    async def _pruned_to(self) -> int:
        row = await self.db.fetchone(
            "SELECT value FROM pool_settings WHERE name = 'events_pruned_to'"
        )
        return int(row["value"]) if row else 0

    async def after(self, token: int) -> list[Row]:
        """The changes after `token`, oldest first (at most MAX_BATCH).
        EVENTS_LOST if some of them were already forgotten."""
        if token < await self._pruned_to():
            raise ApiError("EVENTS_LOST", f"changes after {token} are no longer kept")
        return await self.db.fetchall(
            "SELECT id, class, uuid, ref, operation FROM events WHERE id > ? ORDER BY id LIMIT ?",
            token,
            MAX_BATCH,
        )

    async def wait(self, token: int, deadline: float) -> bool:
        """Until there is a change after `token` or the monotonic `deadline` passes;
        whether there is one."""
        self._waiting += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            while True:
                changed = self._changed
                if await self.latest() > token:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
        finally:
            self._waiting -= 1

    async def _poll(self) -> None:
        """While anyone waits here: one look at the newest id every POLL_INTERVAL for all
        of them, so a change made by another host of the pool wakes them."""
        seen = await self.latest()
        while self._waiting:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                newest = await self.latest()
            except Exception:
                continue  # the database is away for a moment: the waiters time out anyway
            if newest > seen:
                seen = newest
                self.wake()

    async def prune(self, now: float) -> int:
        """Forget changes older than KEEP_EVENTS; tokens from before them get EVENTS_LOST."""
        row = await self.db.fetchone(
            "SELECT MAX(id) AS id FROM events WHERE created < ?", now - KEEP_EVENTS
        )
        if not row or row["id"] is None:
            return 0
        upto = int(row["id"])
        async with self.db.transaction() as tx:
            removed = await tx.execute("DELETE FROM events WHERE id <= ?", upto)
            await tx.execute(
                "INSERT INTO pool_settings (name, value) VALUES ('events_pruned_to', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                str(upto),
            )
        return removed
