"""PUT /import_raw_vdi, GET|HEAD /export_raw_vdi, GET /vdis/{uuid}/extents.

XAPI matches these by prefix (`curl -T disk.raw URL/` appends the file name), and reads
parameters from the query string or from cookies of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from pathlib import Path

from aiohttp import web

from auth.middleware import PRINCIPAL, accepts_ticket, requires
from common.errors import ApiError, bad_request
from common.logfields import LOG_FIELDS
from formats.driver import DATA
from formats.registry import export_formats, upload_formats
from transfer import deltas, exports, imports, layers, pool, resume, storage
from transfer.handlers.common import choose_format, json_response
from transfer.handlers.errors import error_response
from transfer.ranges import requested_range
from transfer.services import services

routes = web.RouteTableDef()


def param(request: web.Request, name: str) -> str | None:
    """A parameter from the query string, else from a cookie of the same name."""
    value = request.query.get(name)
    if value is None:
        value = request.cookies.get(name)
    return value


def flag(request: web.Request, name: str) -> bool:
    """XAPI's boolean parameters: present and not `false` means true."""
    value = param(request, name)
    return value is not None and value.lower() not in ("false", "0", "no")


async def no_automatic_continue(request: web.Request) -> None:
    """Expect: 100-continue is answered by the handler itself, after its checks, so a
    rejected client never sends its body."""
    expect = request.headers.get("Expect", "")
    if expect and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {expect}")


async def send_continue(request: web.Request) -> None:
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _content_length(request: web.Request) -> int | None:
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return None
    return request.content_length


# -- import --------------------------------------------------------------------------------


INTEROP_VERSIONS = ("9",)  # Upload-Draft-Interop-Version values we answer with a 104


@requires("operator")
@accepts_ticket("import")
async def import_raw_vdi(request: web.Request) -> web.StreamResponse:
    params = imports.ImportParams(
        vdi=param(request, "vdi"),
        sr=param(request, "sr"),
        format=choose_format(param(request, "format"), upload_formats(), "import"),
        chunked=flag(request, "chunked"),
        task_id=param(request, "task_id"),
        virtual_size=param(request, "virtual_size"),
        name_label=param(request, "name_label"),
        content_range=_content_range(request.headers.get("Content-Range")),
        complete=_upload_complete(request, default=True),
        # Upload-Complete on an import: the client speaks the resumable-upload draft.
        announced="Upload-Complete" in request.headers,
    )
    return await _import(request, params)


async def _import(request: web.Request, params: imports.ImportParams) -> web.StreamResponse:
    """An import (PUT) or an append to an upload resource (PATCH), from checks to answer."""
    svc = services(request)
    log_fields = request[LOG_FIELDS]
    length = _content_length(request)
    where = await imports.placement(svc, params)
    if where is not None:
        await pool.route(request, "import", *where)
    plan = await imports.plan(svc, params, length)
    log_fields["vdi"] = plan.target_uuid
    if length == 0 and params.complete and not params.content_range:
        # Clients probe with an empty PUT: answer, but create and write nothing.
        return json_response({"task": None, "vdi": plan.target_uuid, "bytes": 0})

    job = await imports.start(svc, plan, request[PRINCIPAL].username)
    transfer = job.transfer
    log_fields.update(vdi=job.vdi["uuid"] if job.vdi else None, task=transfer.task)
    task = await svc.tasks.get(transfer.task)
    headers = {"task-id": task["ref"]}
    if params.resumable:
        headers["Location"] = f"/uploads/{transfer.task}"
    try:
        async with svc.tasks.run(transfer):
            if (
                params.announced
                and request.headers.get("Upload-Draft-Interop-Version", "").strip()
                in INTEROP_VERSIONS
            ):
                await _send_104(request, headers["Location"])
            await send_continue(request)
            received = await imports.receive(svc, job, request.content)
            assert job.vdi is not None
            log_fields["vdi"] = job.vdi["uuid"]
            if plan.params.complete:
                await svc.tasks.succeed(transfer, job.vdi["uuid"])
            else:  # one segment of a resumable upload: durable, and the upload stays open
                await svc.tasks.suspend(transfer, "segment received")
    except asyncio.CancelledError:
        await asyncio.shield(imports.abandon(svc, job, asyncio.CancelledError()))
        raise  # aiohttp closes the connection
    except ApiError as exc:
        await imports.abandon(svc, job, exc)
        log_fields["bytes_in"] = transfer.bytes
        response = error_response(exc, headers)
        response.force_close()  # the rest of the body, if any, is not wanted
        log_fields["error"] = exc.code
        return response
    except BaseException as exc:
        await imports.abandon(svc, job, exc)
        raise
    log_fields["bytes_in"] = received
    await svc.vdis.usage(await svc.vdis.get(job.vdi["uuid"]))  # for the pool's other hosts
    if not plan.params.complete:
        return web.Response(
            status=204, headers={**headers, "Upload-Offset": str(received), "Upload-Complete": "?0"}
        )
    if params.resumable:
        headers["Upload-Complete"] = "?1"
    return json_response(
        {"task": transfer.task, "task_ref": task["ref"], "vdi": job.vdi["uuid"], "bytes": received},
        headers=headers,
    )


async def _send_104(request: web.Request, location: str) -> None:
    """104 (Upload Resumption Supported): the client learns the upload resource early."""
    version = request.headers["Upload-Draft-Interop-Version"].strip()
    await request.writer.write(
        (
            f"HTTP/1.1 104 Upload Resumption Supported\r\nLocation: {location}\r\n"
            f"Upload-Draft-Interop-Version: {version}\r\n\r\n"
        ).encode()
    )


def _upload_complete(request: web.Request, default: bool | None) -> bool:
    """The Upload-Complete structured boolean (?1 / ?0)."""
    value = request.headers.get("Upload-Complete")
    if value is None:
        if default is None:
            raise bad_request("Upload-Complete (?1 or ?0) is required")
        return default
    if value.strip() not in ("?0", "?1"):
        raise bad_request(f"Upload-Complete {value!r} is not ?0 or ?1")
    return value.strip() == "?1"


# -- the upload resource of the resumable-upload draft: /uploads/{task} ---------------------


async def _upload_task(request: web.Request) -> dict:
    svc = services(request)
    task = await svc.tasks.get(request.match_info["task"])
    request[LOG_FIELDS]["task"] = task["uuid"]
    if not task["resumable"]:
        raise ApiError(
            "TASK_NOT_FOUND", f"task {task['uuid']} is not an upload resource", task["uuid"]
        )
    return task


@requires("operator")
async def upload_resource_status(request: web.Request) -> web.Response:
    """HEAD /uploads/{task}: Upload-Offset, Upload-Complete (204); 410 once it failed."""
    task = await _upload_task(request)
    headers = {"Cache-Control": "no-store", "Upload-Offset": str(task["upload_offset"])}
    if task["upload_length"] is not None:
        headers["Upload-Length"] = str(task["upload_length"])
    if task["status"] == "success":
        return web.Response(status=204, headers={**headers, "Upload-Complete": "?1"})
    if task["status"] != "pending":
        return web.Response(status=410, headers=headers)
    return web.Response(status=204, headers={**headers, "Upload-Complete": "?0"})


@requires("operator")
@accepts_ticket("import")
async def upload_append(request: web.Request) -> web.StreamResponse:
    """PATCH /uploads/{task} with application/partial-upload: append at Upload-Offset."""
    task = await _upload_task(request)
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != "application/partial-upload":
        raise ApiError(
            "BAD_REQUEST", "an append needs Content-Type: application/partial-upload", status=415
        )
    try:
        offset = int(request.headers["Upload-Offset"])
    except (KeyError, ValueError):
        raise bad_request("an append needs Upload-Offset: the offset it starts at") from None
    if task["status"] == "pending" and offset != task["upload_offset"]:
        raise ApiError(
            "UPLOAD_OFFSET_MISMATCH",
            f"the upload is at byte {task['upload_offset']}, not {offset}",
            task["upload_offset"],
            offset,
            headers={"Upload-Offset": str(task["upload_offset"]), "Upload-Complete": "?0"},
        )
    length = request.headers.get("Upload-Length")
    params = imports.ImportParams(
        vdi=task["vdi"],
        sr=None,
        format=task["upload_format"] or "raw",
        chunked=bool(task["upload_chunked"]),
        task_id=task["uuid"],
        virtual_size=None,
        name_label=None,
        content_range=(offset, None, int(length) if length and length.isdigit() else None),
        complete=_upload_complete(request, default=None),
    )
    return await _import(request, params)


@requires("operator")
async def upload_cancel(request: web.Request) -> web.Response:
    """DELETE /uploads/{task}: the upload ends (cancelled); a connection feeding it closes."""
    svc = services(request)
    task = await _upload_task(request)
    await svc.tasks.cancel(task["uuid"])
    srs = [Path(row["path"]) for row in await svc.srs.list()]
    await storage.in_thread(resume.discard, svc.config.state_dir, task["uuid"], srs)
    return web.Response(status=204)


def _content_range(value: str | None) -> tuple[int, int | None, int | None] | None:
    """`bytes START-END/TOTAL` (TOTAL may be `*`) as (start, end, total); as curl -C sends."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        raise bad_request(f"Content-Range {value!r} is not bytes START-END/TOTAL")
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        raise bad_request(f"Content-Range {value!r} is not a range inside the upload")
    return start, end, total


@requires("operator")
async def upload_status(request: web.Request) -> web.Response:
    """HEAD /import_raw_vdi?task_id=: how much of a resumable upload is durable."""
    svc = services(request)
    task_id = param(request, "task_id")
    if not task_id:
        raise bad_request("give task_id= of the upload")
    task = await svc.tasks.get(task_id)
    request[LOG_FIELDS]["task"] = task["uuid"]
    headers = {"Cache-Control": "no-store", "Upload-Offset": str(task["upload_offset"])}
    if task["status"] == "success":
        return web.Response(headers={**headers, "Upload-Complete": "?1"})
    if task["status"] != "pending" or not task["resumable"]:
        return web.Response(status=410, headers=headers)
    if task["upload_length"] is not None:
        headers["Upload-Length"] = str(task["upload_length"])
    return web.Response(headers={**headers, "Upload-Complete": "?0"})


# -- export --------------------------------------------------------------------------------


@requires("reader")
@accepts_ticket("export")
async def export_raw_vdi(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    vdi_ident = param(request, "vdi")
    if not vdi_ident:
        raise bad_request("give vdi= (the VDI to export)")
    fmt = choose_format(param(request, "format"), export_formats(), "export")
    chunked = flag(request, "chunked")
    vdi = await svc.vdis.get(vdi_ident)
    vdi_uuid = vdi["uuid"]
    request[LOG_FIELDS]["vdi"] = vdi_uuid
    await pool.route(request, "export", vdi_uuid, await svc.vdis.owner(vdi))
    lease = await svc.vdis.add_reader(vdi_uuid)  # no writer starts while we lay out or send
    try:
        plan = await exports.plan(svc, vdi_uuid, fmt, chunked, param(request, "base"))
        try:
            return await _send_export(request, plan)
        finally:
            await asyncio.shield(plan.close())
    finally:
        await asyncio.shield(svc.vdis.drop_reader(lease))


async def _send_export(request: web.Request, plan: exports.ExportPlan) -> web.StreamResponse:
    svc = services(request)
    total = plan.layout.length
    wanted = None
    try:
        wanted = requested_range(
            request.headers.get("Range"), request.headers.get("If-Range"), plan.etag, total
        )
    except ApiError as exc:
        return error_response(
            exc, {"Content-Range": f"bytes */{total}", "ETag": plan.etag, "Accept-Ranges": "bytes"}
        )
    start, end = wanted if wanted else (0, total)
    response = web.StreamResponse(status=206 if wanted else 200)
    response.headers.update(
        {
            "Content-Type": plan.content_type,
            "Accept-Ranges": "bytes",
            "ETag": plan.etag,
            "Content-Disposition": f'attachment; filename="{plan.filename}"',
            "Cache-Control": "no-cache",
        }
    )
    if wanted:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    response.content_length = end - start
    if request.method == "HEAD":
        await response.prepare(request)
        await response.write_eof()
        return response

    transfer = await svc.tasks.begin(
        None,
        f"export_raw_vdi {plan.vdi['uuid']}",
        request[PRINCIPAL].username,
        plan.vdi["uuid"],
    )
    task = await svc.tasks.get(transfer.task)
    request[LOG_FIELDS]["task"] = transfer.task
    response.headers["task-id"] = task["ref"]
    try:
        async with svc.tasks.run(transfer):
            await response.prepare(request)
            await exports.send(svc, plan, transfer, request, response, start, end)
            await svc.tasks.succeed(transfer, None)
    except asyncio.CancelledError:
        _abort(request)
        raise
    except Exception as exc:
        # The status line is gone: the only honest signal left is a short body.
        _abort(request)
        request[LOG_FIELDS]["error"] = getattr(exc, "code", type(exc).__name__)
        return response
    await response.write_eof()
    return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()


# -- extents -------------------------------------------------------------------------------


@routes.get("/vdis/{uuid}/extents")
@requires("reader")
@accepts_ticket("extents")
async def extents(request: web.Request) -> web.Response:
    """[{start, length, zero}] covering the whole disk: data runs and holes."""
    svc = services(request)
    vdi = await svc.vdis.get(request.match_info["uuid"])
    request[LOG_FIELDS]["vdi"] = vdi["uuid"]
    await pool.route(request, "extents", vdi["uuid"], await svc.vdis.owner(vdi))
    if request.query.get("base"):
        # The difference from an older snapshot: the changed runs only.
        base = await svc.vdis.get(request.query["base"])
        changed = await deltas.changed_runs(svc, vdi, base)
        return json_response(
            [{"start": s, "length": n, "zero": kind != DATA} for s, n, kind in changed]
        )
    files = await svc.vdis.chain_files(vdi)
    chain = await storage.in_thread(functools.partial(layers.open_chain, files, writable=False))
    try:
        data = await storage.in_thread(exports.data_extents, chain)
    finally:
        await storage.in_thread(layers.close_chain, chain)
    out, pos = [], 0
    for start, length in data:
        if start > pos:
            out.append({"start": pos, "length": start - pos, "zero": True})
        out.append({"start": start, "length": length, "zero": False})
        pos = start + length
    if pos < vdi["virtual_size"]:
        out.append({"start": pos, "length": vdi["virtual_size"] - pos, "zero": True})
    return json_response(out)


def add_routes(app: web.Application) -> None:
    for path in ("/import_raw_vdi", "/import_raw_vdi/{tail:.*}"):
        app.router.add_route("PUT", path, import_raw_vdi, expect_handler=no_automatic_continue)
        app.router.add_route("HEAD", path, upload_status)
    app.router.add_route("HEAD", "/uploads/{task}", upload_resource_status)
    app.router.add_route(
        "PATCH", "/uploads/{task}", upload_append, expect_handler=no_automatic_continue
    )
    app.router.add_route("DELETE", "/uploads/{task}", upload_cancel)
    for path in ("/export_raw_vdi", "/export_raw_vdi/{tail:.*}"):
        app.router.add_get(path, export_raw_vdi)  # and HEAD
    app.add_routes(routes)
