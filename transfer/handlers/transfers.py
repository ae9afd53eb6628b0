"""PUT /import_raw_vdi, GET|HEAD /export_raw_vdi, GET /vdis/{uuid}/extents.

XAPI matches these by prefix (`curl -T disk.raw URL/` appends the file name), and reads
parameters from the query string or from cookies of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from auth.middleware import PRINCIPAL, accepts_ticket, requires
from common.errors import ApiError, bad_request
from common.logfields import LOG_FIELDS
from formats.registry import EXPORT_FORMATS, UPLOAD_FORMATS
from transfer import checksums, exports, imports, parts, pool
from transfer.handlers.common import choose_format, json_response
from transfer.handlers.errors import error_response
from transfer.handlers.streams import RequestBody, ResponseSink, send_interim
from transfer.limits import Pace
from transfer.ranges import requested_range
from transfer.services import Services, services


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


def _content_length(request: web.Request) -> int | None:
    """The body's length, if the request says it (Transfer-Encoding: chunked does not)."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        return None
    return request.content_length


# -- import --------------------------------------------------------------------------------


T = TypeVar("T")
INTEROP_VERSIONS = ("9",)  # Upload-Draft-Interop-Version values we answer with a 104


@requires("operator")
@accepts_ticket("import")
async def import_raw_vdi(request: web.Request) -> web.StreamResponse:
    """PUT /import_raw_vdi: a disk into a VDI (vdi=) or a new one (sr=), in any upload
    format; with task_id= (or Upload-Complete) a resumable upload, continued with
    Content-Range."""
    task = param(request, "task_id")
    async with _failing_given_task(request, task):
        params = imports.ImportParams(
            vdi=param(request, "vdi"),
            sr=param(request, "sr"),
            format=choose_format(param(request, "format"), UPLOAD_FORMATS, "import"),
            chunked=flag(request, "chunked"),
            task_id=task,
            virtual_size=param(request, "virtual_size"),
            name_label=param(request, "name_label"),
            content_range=_content_range(request.headers.get("Content-Range")),
            complete=_upload_complete(request, default=True),
            # Upload-Complete on an import: the client speaks the resumable-upload draft.
            announced="Upload-Complete" in request.headers,
            parts=_count(request, "parts"),
            part=_count(request, "part"),
        )
    if params.parts is not None:
        return await _import_part(request, params)
    return await _import(request, params)


def _count(request: web.Request, name: str) -> int | None:
    """A whole number parameter, in ASCII digits."""
    value = param(request, name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 6:
        raise bad_request(f"{name}= must be a whole number, not {value!r}")
    return int(value)


async def _import(request: web.Request, params: imports.ImportParams) -> web.StreamResponse:
    """An import (PUT) or an append to an upload resource (PATCH), from checks to answer."""
    with contextlib.ExitStack() as slot:
        return await _import_in(request, params, slot)


async def _import_in(
    request: web.Request, params: imports.ImportParams, slot: contextlib.ExitStack
) -> web.StreamResponse:
    svc = services(request)
    log_fields = request[LOG_FIELDS]
    async with _failing_given_task(request, params.task_id):
        _refuse_encodings(request)
        length = _content_length(request)
        where = await imports.placement(svc, params)
        if where is not None:
            await pool.route(request, "import", *where)
        # Here, not on the host that redirects; before the 100 Continue and the body.
        slot.enter_context(svc.slots.take(request[PRINCIPAL].username))
        op = await imports.Import.plan(svc, params, length)
        log_fields["vdi"] = op.target_uuid
        if op.probe:
            # Clients probe with an empty PUT: answer, but create and write nothing.
            return json_response({"task": None, "vdi": op.target_uuid, "bytes": 0})
        await op.start(request[PRINCIPAL])
    log_fields.update(vdi=op.target_uuid, task=op.task)
    headers = {"task-id": op.task_ref}
    if params.resumable:
        headers["Location"] = f"/uploads/{op.task}"

    received = await _with_body(request, params, headers, op.run)
    if isinstance(received, web.StreamResponse):
        return received
    log_fields["vdi"] = op.target_uuid
    if not params.complete:
        return web.Response(
            status=204, headers={**headers, "Upload-Offset": str(received), "Upload-Complete": "?0"}
        )
    if params.resumable:
        headers["Upload-Complete"] = "?1"
    return json_response(
        {"task": op.task, "task_ref": op.task_ref, "vdi": op.target_uuid, "bytes": received},
        headers=headers,
    )


async def _import_part(request: web.Request, params: imports.ImportParams) -> web.StreamResponse:
    """One part of an upload sent over several connections at once (transfer/parts.py)."""
    svc = services(request)
    log_fields = request[LOG_FIELDS]
    assert svc.parted is not None
    with contextlib.ExitStack() as slot:
        async with _failing_given_task(request, params.task_id):
            _refuse_encodings(request)
            parts.check(params)
            await pool.route(request, "import", *await parts.placement(svc, params))
            slot.enter_context(svc.slots.take(request[PRINCIPAL].username))
            part = await svc.parted.join(params, request[PRINCIPAL], _content_length(request))
        log_fields.update(vdi=part.vdi, task=part.task, part=part.number)
        headers = {"task-id": part.task_ref}
        answer = await _with_body(request, params, headers, part.run)
    if isinstance(answer, web.StreamResponse):
        return answer
    return json_response(answer, headers=headers)


async def _with_body(
    request: web.Request,
    params: imports.ImportParams,
    headers: dict,
    run: Callable[[RequestBody, Callable[[], Awaitable[None]]], Awaitable[T]],
) -> T | web.StreamResponse:
    """`run` (an import, or a part of one) given the body, counted, paced and tracked; an
    ApiError becomes the answer, and the connection closes (the rest of the body, if any,
    is not wanted)."""
    svc = services(request)
    log_fields = request[LOG_FIELDS]
    body = RequestBody(
        request,
        functools.partial(svc.metrics.moved, "import", params.format),
        Pace(svc.pacing, "the upload"),
    )
    try:
        with svc.metrics.in_flight.labels("import").track_inprogress():
            return await run(body, functools.partial(_go_ahead, request, body, params, headers))
    except ApiError as exc:
        log_fields["error"] = exc.code
        response = error_response(exc, headers)
        response.force_close()
        return response
    finally:
        body.close()
        log_fields["bytes_in"] = body.received


async def _go_ahead(
    request: web.Request, body: RequestBody, params: imports.ImportParams, headers: dict
) -> None:
    """Every check passed and the task runs: now the client may send its body."""
    body.take_over()
    version = request.headers.get("Upload-Draft-Interop-Version", "").strip()
    if params.announced and version in INTEROP_VERSIONS:
        # 104 (Upload Resumption Supported): the client learns the resource early.
        interim = {"Location": headers["Location"], "Upload-Draft-Interop-Version": version}
        await send_interim(request, "104 Upload Resumption Supported", interim)
    expect = request.headers.get("Expect", "").lower() == "100-continue"
    if expect and request.version >= (1, 1):
        await send_interim(request, "100 Continue", {})


@contextlib.asynccontextmanager
async def _failing_given_task(request: web.Request, task: str | None) -> AsyncIterator[None]:
    """A transfer refused before it began fails the task the client named for it, if
    nothing used that task yet: a XenAPI client waiting for it would wait forever."""
    try:
        yield
    except ApiError as exc:
        if task:
            await services(request).tasks.fail_unused(task, request[PRINCIPAL], exc.error_info)
        raise


def _refuse_encodings(request: web.Request) -> None:
    """An image body is taken as sent. A compressed one would be inflated by aiohttp
    without bound and checked against its compressed length, so it is refused before
    100 Continue: send it uncompressed (qcow2 may compress its clusters itself)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            "UNSUPPORTED_MEDIA_TYPE",
            f"Content-Encoding {encoding} is not accepted on an import: send the image "
            "uncompressed (a qcow2 image may compress its clusters itself)",
            encoding,
        )
    codings = [c.strip().lower() for c in request.headers.get("Transfer-Encoding", "").split(",")]
    if any(c not in ("", "chunked", "identity") for c in codings):
        raise ApiError(
            "NOT_IMPLEMENTED",
            f"Transfer-Encoding {request.headers['Transfer-Encoding']} is not implemented: "
            "only chunked",
            request.headers["Transfer-Encoding"],
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
    task = await _upload_task(request)
    services(request).tasks.check_owner(task, request[PRINCIPAL])
    await imports.cancel_upload(services(request), task["uuid"])
    return web.Response(status=204)


# -- export --------------------------------------------------------------------------------


@requires("reader")
@accepts_ticket("export")
async def export_raw_vdi(request: web.Request) -> web.StreamResponse:
    """GET|HEAD /export_raw_vdi: a VDI in any export format (or XAPI's chunk framing),
    whole or what changed since base=, with Range and If-Range on any byte of it."""
    svc = services(request)
    task = param(request, "task_id") if request.method == "GET" else None
    async with _failing_given_task(request, task):
        vdi_ident = param(request, "vdi")
        if not vdi_ident:
            raise bad_request("give vdi= (the VDI to export)")
        fmt = choose_format(param(request, "format"), EXPORT_FORMATS, "export")
        chunked = flag(request, "chunked")
        vdi = await svc.vdis.get(vdi_ident)
        request[LOG_FIELDS]["vdi"] = vdi["uuid"]
        await pool.route(request, "export", vdi["uuid"], await svc.vdis.owner(vdi))
        base = param(request, "base")
        with svc.slots.take(request[PRINCIPAL].username):
            async with exports.opened(svc, vdi["uuid"], fmt, chunked, base) as export:
                return await _send_export(request, export, task)


async def _send_export(
    request: web.Request, export: exports.Export, task: str | None
) -> web.StreamResponse:
    total = export.length
    wanted = None
    try:
        wanted = requested_range(
            request.headers.get("Range"), request.headers.get("If-Range"), export.etag, total
        )
    except ApiError as exc:
        if task:
            await services(request).tasks.fail_unused(task, request[PRINCIPAL], exc.error_info)
        return error_response(
            exc,
            {"Content-Range": f"bytes */{total}", "ETag": export.etag, "Accept-Ranges": "bytes"},
        )
    start, end = wanted if wanted else (0, total)
    response = web.StreamResponse(status=206 if wanted else 200)
    response.headers.update(
        {
            "Content-Type": export.content_type,
            "Accept-Ranges": "bytes",
            "ETag": export.etag,
            "Content-Disposition": f'attachment; filename="{export.filename}"',
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

    await export.start(request[PRINCIPAL], task)
    request[LOG_FIELDS]["task"] = export.task
    response.headers["task-id"] = export.task_ref
    try:
        svc = services(request)
        with svc.metrics.in_flight.labels("export").track_inprogress():
            await export.send(ResponseSink(request, response), start, end, svc.pacing)
    except asyncio.CancelledError:
        _abort(request)
        raise
    except Exception as exc:
        # The status line is gone: the only honest signal left is a short body.
        _abort(request)
        request[LOG_FIELDS]["error"] = getattr(exc, "code", type(exc).__name__)
        return response
    finally:
        request[LOG_FIELDS]["bytes_out"] = export.bytes_sent
    await response.write_eof()
    return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()


# -- extents -------------------------------------------------------------------------------


@requires("reader")
@accepts_ticket("extents")
async def extents(request: web.Request) -> web.Response:
    """GET /vdis/{uuid}/extents: [{start, length, zero}] covering the whole disk (data runs
    and holes), or with ?base= only the runs that differ from that older snapshot."""
    svc = services(request)
    vdi = await svc.vdis.get(request.match_info["uuid"])
    request[LOG_FIELDS]["vdi"] = vdi["uuid"]
    await pool.route(request, "extents", vdi["uuid"], await svc.vdis.owner(vdi))
    base = await svc.vdis.get(request.query["base"]) if request.query.get("base") else None
    runs = await exports.extents(svc, vdi, base)
    return json_response([{"start": s, "length": n, "zero": zero} for s, n, zero in runs])


# -- checksum ------------------------------------------------------------------------------


@requires("reader")
@accepts_ticket("checksum")
async def checksum(request: web.Request) -> web.Response:
    """GET /vdis/{uuid}/checksum?algorithm=sha256|blake2b&block_size=4MiB: a checksum of the
    disk's content, the same whatever its runtime format or sparseness (transfer/checksums.py)."""
    svc = services(request)
    algorithm, block_size = checksums.parse_request(
        request.query.get("algorithm"), request.query.get("block_size")
    )
    vdi = await svc.vdis.get(request.match_info["uuid"])
    request[LOG_FIELDS]["vdi"] = vdi["uuid"]
    await pool.route(request, "checksum", vdi["uuid"], await svc.vdis.owner(vdi))
    return json_response(await checksums.checksum(svc, vdi["uuid"], algorithm, block_size))


# -- capabilities --------------------------------------------------------------------------

MAX_READERS = 8  # connections a client may read one VDI with (Range), as ovirt-imageio says


def _per_user(svc: Services, most: int) -> int:
    """Connections one client may use at once: `most`, within the per-user limit."""
    per_user = svc.config.max_user_transfers
    return min(most, per_user) if per_user else most


@requires("reader")
async def import_options(request: web.Request) -> web.Response:
    """OPTIONS /import_raw_vdi: what an upload may use, for clients that adapt (how many
    connections, which formats, resumable uploads, XAPI chunk framing)."""
    return json_response(
        {
            "formats": list(UPLOAD_FORMATS),
            "max_writers": _per_user(services(request), parts.MAX_PARTS),
            "features": ["chunked", "resumable", "content-range", "upload-resource", "parts"],
        },
        headers={"Allow": "OPTIONS, PUT, HEAD"},
    )


@requires("reader")
async def export_options(request: web.Request) -> web.Response:
    """OPTIONS /export_raw_vdi: what a download may use: several connections reading
    ranges of one VDI at once, the formats, and incremental exports."""
    return json_response(
        {
            "formats": list(EXPORT_FORMATS),
            "max_readers": _per_user(services(request), MAX_READERS),
            "features": ["range", "if-range", "chunked", "base", "extents", "checksum"],
        },
        headers={"Allow": "OPTIONS, GET, HEAD"},
    )
