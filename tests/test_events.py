"""The event log behind event.from, on SQLite and on PostgreSQL: changes come back in
order after a token, a waiter wakes when one is recorded, and a token older than the log
keeps is EVENTS_LOST rather than a silent gap."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.errors import ApiError
from transfer import events
from transfer.services import SERVICES


def log_of(client) -> events.EventLog:
    return client.server.app[SERVICES].events


async def test_changes_after_a_token_in_order(client):
    log = log_of(client)
    start = await log.latest()
    await log.record("task", "a", "add")
    await log.record("vdi", "b", "del", ref="OpaqueRef:b")
    changes = await log.after(start)
    assert [(c["class"], c["uuid"], c["operation"], c["ref"]) for c in changes] == [
        ("task", "a", "add", None),
        ("vdi", "b", "del", "OpaqueRef:b"),
    ]
    assert changes[0]["id"] < changes[1]["id"] == await log.latest()
    assert await log.after(changes[-1]["id"]) == []


async def test_a_waiter_wakes_when_a_change_is_recorded(client):
    log = log_of(client)
    token = await log.latest()
    started = time.monotonic()
    waiter = asyncio.create_task(log.wait(token, time.monotonic() + 10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    async with log.db.transaction() as tx:  # recorded inside the change's transaction
        await log.record("task", "c", db=tx)
    assert await asyncio.wait_for(waiter, 5) is True
    assert time.monotonic() - started < 1.0
    assert await log.wait(await log.latest(), time.monotonic() + 0.2) is False


async def test_old_tokens_are_events_lost(client, monkeypatch):
    log = log_of(client)
    await log.record("task", "old")
    token = await log.latest()
    await log.record("task", "newer")
    monkeypatch.setattr(events, "KEEP_EVENTS", -1.0)  # everything recorded counts as old
    assert await log.prune(time.time()) >= 2
    with pytest.raises(ApiError) as lost:
        await log.after(token - 1)
    assert lost.value.code == "EVENTS_LOST"
    assert await log.after(await log.latest()) == []
