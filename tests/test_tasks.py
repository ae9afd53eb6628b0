"""Task life cycle: create, poll, cancel, destroy, GC, restart recovery, shutdown."""

from __future__ import annotations

import asyncio
import time

from common.errors import ApiError
from tests.conftest import ADMIN
from tests.test_records import assert_error, json_of
from transfer.app import create_app
from transfer.services import SERVICES


def svc_of(client):
    return client.server.app[SERVICES]


async def new_task(client, name="backup"):
    return await json_of(await client.post("/tasks", json={"name_label": name}, headers=ADMIN), 201)


async def get_task(client, ident):
    return await json_of(await client.get(f"/tasks/{ident}", headers=ADMIN), 200)


async def start_transfer(svc, task_ident=None, vdi=None):
    """Something that holds a task the way an import does, until it is stopped."""
    started = asyncio.Event()
    holder: dict = {}

    async def run():
        transfer = await svc.tasks.begin(task_ident, "fake transfer", "admin", vdi)
        holder["transfer"] = transfer
        async with svc.tasks.run(transfer):
            await svc.tasks.report(transfer, 10, 0.25)
            started.set()
            await asyncio.sleep(3600)

    job = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 5)
    return job, holder["transfer"]


async def test_create_and_read(client):
    task = await new_task(client)
    assert task["status"] == "pending" and task["progress"] == 0.0
    assert task["ref"].startswith("OpaqueRef:")
    assert task["result"] is None and task["error_info"] == [] and task["finished"] is None
    assert task["bytes_transferred"] == 0 and task["name_label"] == "backup"
    assert (await get_task(client, task["ref"])) == task
    listed = await json_of(await client.get("/tasks", headers=ADMIN), 200)
    assert [t["uuid"] for t in listed] == [task["uuid"]]
    await assert_error(await client.post("/tasks", json={}, headers=ADMIN), 400, "BAD_REQUEST")
    await assert_error(await client.get("/tasks/nope", headers=ADMIN), 404, "TASK_NOT_FOUND")


async def test_cancel_idle_task(client):
    task = await new_task(client)
    resp = await client.post(f"/tasks/{task['uuid']}/cancel", headers=ADMIN)
    task = await json_of(resp, 200)
    assert task["status"] == "cancelled" and task["error_info"] == ["CANCELLED"]
    assert task["finished"] is not None
    # Cancelling again changes nothing.
    again = await json_of(await client.post(f"/tasks/{task['uuid']}/cancel", headers=ADMIN), 200)
    assert again == task


async def test_cancel_running_transfer(client):
    svc = svc_of(client)
    task = await new_task(client)
    job, _ = await start_transfer(svc, task["uuid"])
    live = await get_task(client, task["uuid"])
    assert live["status"] == "pending" and live["progress"] == 0.25
    assert live["bytes_transferred"] == 10
    # A running task cannot be destroyed, and cannot take a second transfer.
    await assert_error(
        await client.delete(f"/tasks/{task['uuid']}", headers=ADMIN),
        409,
        "OTHER_OPERATION_IN_PROGRESS",
    )
    try:
        await svc.tasks.begin(task["uuid"], "again", "admin", None)
        raise AssertionError("a second transfer was attached")
    except ApiError as exc:
        assert exc.code == "OTHER_OPERATION_IN_PROGRESS"

    t0 = time.monotonic()
    await client.post(f"/tasks/{task['uuid']}/cancel", headers=ADMIN)
    done, _ = await asyncio.wait([job], timeout=1)
    assert done, "the transfer did not stop within a second"
    assert time.monotonic() - t0 < 1
    final = await get_task(client, task["uuid"])
    assert final["status"] == "cancelled" and final["error_info"] == ["CANCELLED"]
    assert final["bytes_transferred"] == 10
    assert (await client.delete(f"/tasks/{task['uuid']}", headers=ADMIN)).status == 204


async def test_transfer_success_failure_and_vdi_lock(client):
    svc = svc_of(client)
    vdi = await json_of(await client.post("/vdis", json={"virtual_size": 4096}, headers=ADMIN), 201)
    transfer = await svc.tasks.begin(None, "import", "admin", vdi["uuid"])
    await svc.vdis.lock(vdi["uuid"], transfer.task)
    async with svc.tasks.run(transfer):
        await svc.tasks.report(transfer, 4096, 0.5)
        await svc.tasks.succeed(transfer, vdi["uuid"])
    task = await get_task(client, transfer.task)
    assert task["status"] == "success" and task["result"] == vdi["uuid"]
    assert task["progress"] == 1.0 and task["bytes_transferred"] == 4096
    assert task["vdi"] == vdi["uuid"] and task["owner"] == "admin"
    # The VDI is free again: it can be deleted.
    await svc.vdis.lock(vdi["uuid"], "next")
    await svc.vdis.unlock(vdi["uuid"], "next")

    transfer = await svc.tasks.begin(None, "import", "admin", vdi["uuid"])
    await svc.vdis.lock(vdi["uuid"], transfer.task)
    try:
        async with svc.tasks.run(transfer):
            raise ApiError("VDI_TOO_SMALL", "too big", vdi["uuid"])
    except ApiError:
        pass
    task = await get_task(client, transfer.task)
    assert task["status"] == "failure" and task["error_info"] == ["VDI_TOO_SMALL", vdi["uuid"]]
    assert (await client.delete(f"/vdis/{vdi['uuid']}", headers=ADMIN)).status == 204


async def test_bug_in_transfer_is_internal_error(client):
    svc = svc_of(client)
    transfer = await svc.tasks.begin(None, "import", "admin", None)
    try:
        async with svc.tasks.run(transfer):
            raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        pass
    task = await get_task(client, transfer.task)
    assert task["status"] == "failure" and task["error_info"] == ["INTERNAL_ERROR", "boom"]


async def test_finished_task_cannot_take_a_transfer(client):
    svc = svc_of(client)
    task = await new_task(client)
    await client.post(f"/tasks/{task['uuid']}/cancel", headers=ADMIN)
    try:
        await svc.tasks.begin(task["uuid"], "x", "admin", None)
        raise AssertionError("a finished task was reused")
    except ApiError as exc:
        assert exc.code == "BAD_REQUEST" and "cancelled" in exc.message


async def test_garbage_collection(client):
    svc = svc_of(client)
    old, fresh, pending = await new_task(client), await new_task(client), await new_task(client)
    for t in (old, fresh):
        await client.post(f"/tasks/{t['uuid']}/cancel", headers=ADMIN)
    await svc.db.execute(
        "UPDATE tasks SET finished = ? WHERE uuid = ?", time.time() - svc.tasks.ttl - 1, old["uuid"]
    )
    assert await svc.tasks.collect_garbage() == 1
    listed = {t["uuid"] for t in await json_of(await client.get("/tasks", headers=ADMIN), 200)}
    assert listed == {fresh["uuid"], pending["uuid"]}


async def test_restart_fails_running_tasks_and_keeps_idle_ones(aiohttp_client, config):
    """A process that dies mid-transfer: on restart its task fails with 'server restarted',
    its VDI is released, and a task no transfer used is still pending."""
    client = await aiohttp_client(create_app(config))
    svc = svc_of(client)
    vdi = await json_of(await client.post("/vdis", json={"virtual_size": 4096}, headers=ADMIN), 201)
    idle = await new_task(client, "idle")
    cancelling = await new_task(client, "cancelling")
    transfer = await svc.tasks.begin(None, "import", "admin", vdi["uuid"])
    await svc.vdis.lock(vdi["uuid"], transfer.task)
    await svc.tasks.begin(cancelling["uuid"], "import", "admin", None)
    await svc.db.execute(
        "UPDATE tasks SET status = 'cancelling' WHERE uuid = ?", cancelling["uuid"]
    )
    # Crash: the process forgets its transfers without ending them.
    svc.tasks.running.clear()
    await client.close()

    client = await aiohttp_client(create_app(config))
    crashed = await get_task(client, transfer.task)
    assert crashed["status"] == "failure"
    assert crashed["error_info"] == ["INTERNAL_ERROR", "server restarted"]
    assert crashed["finished"] is not None
    assert (await get_task(client, cancelling["uuid"]))["status"] == "cancelled"
    assert (await get_task(client, idle["uuid"]))["status"] == "pending"
    assert (await client.delete(f"/vdis/{vdi['uuid']}", headers=ADMIN)).status == 204


async def test_shutdown_fails_running_transfers(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    svc = svc_of(client)
    job, transfer = await start_transfer(svc)
    await client.close()  # runs on_shutdown and cleanup, as SIGTERM does
    assert job.done()
    client = await aiohttp_client(create_app(config))
    task = await get_task(client, transfer.task)
    assert task["status"] == "failure"
    assert task["error_info"] == ["INTERNAL_ERROR", "server shutting down"]


async def test_a_break_that_meets_a_cancel_ends_the_upload_cancelled(client):
    """A resumable upload cut off while its cancel is under way (the task `cancelling`) is
    not suspended: nobody will continue it, and it must not stay `cancelling` for ever."""
    svc = svc_of(client)
    task = await new_task(client)
    transfer = await svc.tasks.begin(task["uuid"], "upload", "admin", None)
    transfer.resumable = True
    transfer.aio_task = None  # the cancel finds nothing to stop: the break comes first
    await svc.tasks.cancel(task["uuid"])
    assert (await get_task(client, task["uuid"]))["status"] == "cancelling"
    await svc.tasks.suspend(transfer, "the client went away")
    row = await get_task(client, task["uuid"])
    assert row["status"] == "cancelled" and row["error_info"] == ["CANCELLED"]
    # and a plain break is still a suspension
    other = await new_task(client)
    transfer = await svc.tasks.begin(other["uuid"], "upload", "admin", None)
    transfer.resumable = True
    await svc.tasks.suspend(transfer, "the client went away")
    assert (await get_task(client, other["uuid"]))["status"] == "pending"
