"""Hosts, SRs, VDIs and tasks as JSON records."""

from __future__ import annotations

import asyncio
import base64

from aiohttp import web

from auth.middleware import PRINCIPAL, accepts_ticket, requires
from common.errors import bad_request
from common.logfields import LOG_FIELDS
from transfer import cbt, pool
from transfer.handlers.common import field, json_response, read_json
from transfer.services import services
from transfer.sizes import parse_size

# -- hosts ---------------------------------------------------------------------------------


@requires("reader")
async def list_hosts(request: web.Request) -> web.Response:
    """GET /hosts: the records of all hosts of the pool, with their liveness."""
    hosts = services(request).hosts
    return json_response([hosts.to_json(row) for row in await hosts.list()])


@requires("reader")
async def get_host(request: web.Request) -> web.Response:
    """GET /hosts/{uuid}: the host's record."""
    hosts = services(request).hosts
    return json_response(hosts.to_json(await hosts.get(request.match_info["uuid"])))


# -- SRs -----------------------------------------------------------------------------------


@requires("reader")
async def list_srs(request: web.Request) -> web.Response:
    """GET /srs: the records of all SRs, with their sizes."""
    srs = services(request).srs
    return json_response(await asyncio.gather(*(srs.to_json(r) for r in await srs.list())))


@requires("reader")
async def get_sr(request: web.Request) -> web.Response:
    """GET /srs/{uuid}: the SR's record."""
    srs = services(request).srs
    return json_response(await srs.to_json(await srs.get(request.match_info["uuid"])))


# -- VDIs ----------------------------------------------------------------------------------


@requires("reader")
async def list_vdis(request: web.Request) -> web.Response:
    """All VDIs, or those of one SR with ?sr=."""
    vdis = services(request).vdis
    rows = await vdis.list(request.query.get("sr"))
    return json_response([await vdis.to_json(row) for row in rows])


@requires("reader")
async def get_vdi(request: web.Request) -> web.Response:
    """GET /vdis/{uuid}: the VDI's record."""
    vdis = services(request).vdis
    row = await vdis.get(request.match_info["uuid"])
    request[LOG_FIELDS]["vdi"] = row["uuid"]
    return json_response(await vdis.to_json(row))


@requires("operator")
@accepts_ticket("create")
async def create_vdi(request: web.Request) -> web.Response:
    """JSON {sr?, name_label?, virtual_size, image_format?} -> 201 with the new record.
    Without `sr`, the VDI goes to this host's local SR."""
    svc = services(request)
    body = await read_json(request)
    sr_ident = field(body, "sr", str, None)
    sr = await svc.srs.get(sr_ident) if sr_ident else await svc.srs.default()
    await pool.route(request, "create", sr["uuid"], svc.srs.owner(sr))
    if "virtual_size" not in body:
        field(body, "virtual_size", int, required=True)
    size = parse_size(body["virtual_size"], "virtual_size")
    row = await svc.vdis.create(
        sr,
        field(body, "name_label", str, ""),
        size,
        field(body, "image_format", str, None),
    )
    request[LOG_FIELDS]["vdi"] = row["uuid"]
    return json_response(await svc.vdis.to_json(row), status=201)


async def _served_vdi(request: web.Request, operation: str) -> str:
    """The VDI of the path, once this host is the one to serve `operation` on it."""
    vdis = services(request).vdis
    vdi = await vdis.get(request.match_info["uuid"])
    request[LOG_FIELDS]["vdi"] = vdi["uuid"]
    await pool.route(request, operation, vdi["uuid"], await vdis.owner(vdi))
    return vdi["uuid"]


@requires("operator")
@accepts_ticket("update")
async def update_vdi(request: web.Request) -> web.Response:
    """PATCH /vdis/{uuid} JSON {"cbt_enabled": bool}: turn changed block tracking on or off
    (off discards the VDI's change log); the record."""
    svc = services(request)
    ident = await _served_vdi(request, "update")
    body = await read_json(request)
    unknown = set(body) - {"cbt_enabled"}
    if unknown:
        raise bad_request(f"only cbt_enabled can be changed, not {', '.join(sorted(unknown))}")
    row = await svc.vdis.set_cbt(ident, field(body, "cbt_enabled", bool, required=True))
    return json_response(await svc.vdis.to_json(row))


@requires("operator")
@accepts_ticket("data_destroy")
async def data_destroy_vdi(request: web.Request) -> web.Response:
    """POST /vdis/{snapshot}/data_destroy: release a tracked snapshot's data; its record
    stays (type cbt_metadata) as a base for incremental exports and changed blocks."""
    svc = services(request)
    ident = await _served_vdi(request, "data_destroy")
    return json_response(await svc.vdis.to_json(await svc.vdis.data_destroy(ident)))


@requires("reader")
@accepts_ticket("changed_blocks")
async def changed_blocks(request: web.Request) -> web.Response:
    """GET /vdis/{to}/changed_blocks?base={from}: the 64 KiB blocks that differ between
    two versions of a disk, as XAPI's VDI.list_changed_blocks encodes them."""
    svc = services(request)
    ident = await _served_vdi(request, "changed_blocks")
    base_ident = request.query.get("base")
    if not base_ident:
        raise bad_request("give base= (the other version of the disk)")
    to, base = await svc.vdis.get(ident), await svc.vdis.get(base_ident)
    bitmap = await svc.vdis.changed_blocks(to, base)
    return json_response(
        {"block_size": cbt.BLOCK, "bitmap": base64.b64encode(bitmap).decode("ascii")}
    )


@requires("operator")
@accepts_ticket("delete")
async def delete_vdi(request: web.Request) -> web.Response:
    """DELETE /vdis/{uuid}: remove the VDI, on the host that serves it; answers 204."""
    await services(request).vdis.delete(await _served_vdi(request, "delete"))
    return web.Response(status=204)


@requires("operator")
@accepts_ticket("snapshot")
async def snapshot_vdi(request: web.Request) -> web.Response:
    """A read-only snapshot; JSON {name_label?} -> 201 with the snapshot's record."""
    return await _derive(request, snapshot=True)


@requires("operator")
@accepts_ticket("clone")
async def clone_vdi(request: web.Request) -> web.Response:
    """A writable copy; JSON {name_label?} -> 201 with the new VDI's record."""
    return await _derive(request, snapshot=False)


async def _derive(request: web.Request, snapshot: bool) -> web.Response:
    vdis = services(request).vdis
    ident = await _served_vdi(request, "snapshot" if snapshot else "clone")
    body = await read_json(request)
    name = field(body, "name_label", str, None)
    row = await (vdis.snapshot(ident, name) if snapshot else vdis.clone(ident, name))
    request[LOG_FIELDS]["vdi"] = row["uuid"]
    return json_response(await vdis.to_json(row), status=201)


# -- tasks ---------------------------------------------------------------------------------


@requires("reader")
async def list_tasks(request: web.Request) -> web.Response:
    """GET /tasks: the records of all tasks."""
    tasks = services(request).tasks
    return json_response([tasks.to_json(row) for row in await tasks.list()])


@requires("reader")
async def get_task(request: web.Request) -> web.Response:
    """GET /tasks/{uuid}: the task's record, with its progress."""
    tasks = services(request).tasks
    row = await tasks.get(request.match_info["uuid"])
    request[LOG_FIELDS]["task"] = row["uuid"]
    return json_response(tasks.to_json(row))


@requires("operator")
async def create_task(request: web.Request) -> web.Response:
    """JSON {name_label} -> 201: a task to pass as task_id= to a later transfer."""
    svc = services(request)
    body = await read_json(request)
    row = await svc.tasks.create(
        field(body, "name_label", str, required=True), request[PRINCIPAL].username
    )
    request[LOG_FIELDS]["task"] = row["uuid"]
    return json_response(svc.tasks.to_json(row), status=201)


@requires("operator")
async def cancel_task(request: web.Request) -> web.Response:
    """POST /tasks/{uuid}/cancel: cancel the task (and stop its transfer); its record."""
    tasks = services(request).tasks
    owned = await tasks.get_owned(request.match_info["uuid"], request[PRINCIPAL])
    row = await tasks.cancel(owned["uuid"])
    request[LOG_FIELDS]["task"] = row["uuid"]
    return json_response(tasks.to_json(row))


@requires("operator")
async def destroy_task(request: web.Request) -> web.Response:
    """DELETE /tasks/{uuid}: forget a task that has no transfer running; answers 204."""
    request[LOG_FIELDS]["task"] = request.match_info["uuid"]
    tasks = services(request).tasks
    owned = await tasks.get_owned(request.match_info["uuid"], request[PRINCIPAL])
    await tasks.destroy(owned["uuid"])
    return web.Response(status=204)
