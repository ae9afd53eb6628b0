"""The XenAPI methods this server answers: sessions, records of the pool, hosts, SRs, VDIs and
tasks, the VDI operations and the task life cycle. Each one is a thin layer over the same
services the HTTP API uses, so both see and change the same records.
"""

from __future__ import annotations

import base64
from typing import Any

from transfer.db import Row
from transfer.rpc import watch
from transfer.rpc.dispatch import Context, XapiError, integer, method_names, text, xapi
from transfer.rpc.records import RecordView, pool_identity

# -- session -------------------------------------------------------------------------------


@xapi("session.login_with_password", session=False)
async def login_with_password(
    ctx: Context, uname: Any, pwd: Any, version: Any = "", originator: Any = ""
) -> str:
    """A session reference, valid for the HTTP API (session_id=) as well."""
    username, password = text(uname, "uname"), text(pwd, "pwd")
    principal = await ctx.svc.auth.check_password(username, password, ctx.remote)
    return ctx.svc.auth.signer.issue(principal.username).token


@xapi("session.logout", None)
async def logout(ctx: Context) -> str:
    """Revoke the calling session, everywhere in the pool."""
    assert ctx.session is not None
    await ctx.svc.auth.revoke(ctx.session)
    return ""


@xapi("session.get_uuid", None)
async def session_uuid(ctx: Context, session: Any) -> str:
    """A session's uuid (the id its revocation is kept under)."""
    return ctx.svc.auth.signer.verify(text(session, "self")).jti


@xapi("session.get_this_host", None)
async def session_this_host(ctx: Context, session: Any) -> str:
    """The host that answers: the one that issued or checks the session."""
    return (await ctx.svc.hosts.get(ctx.svc.hosts.uuid))["ref"]


@xapi("system.listMethods", session=False)
async def list_methods(ctx: Context, session: Any = None) -> list[str]:
    """Every method this server answers. Needs no session; XenAPI.py sends one anyway."""
    return method_names()


# -- records, class by class ---------------------------------------------------------------

GETTERS = {
    "pool": ("uuid", "name_label", "master", "default_SR", "other_config"),
    "host": ("uuid", "name_label", "address", "hostname", "software_version"),
    "SR": ("uuid", "name_label", "type", "VDIs", "physical_size", "physical_utilisation"),
    "VDI": (
        "uuid",
        "name_label",
        "name_description",
        "SR",
        "virtual_size",
        "physical_utilisation",
        "type",
        "read_only",
        "is_a_snapshot",
        "snapshot_of",
        "snapshots",
        "snapshot_time",
        "sm_config",
        "other_config",
        "cbt_enabled",
    ),
    "task": (
        "uuid",
        "name_label",
        "status",
        "progress",
        "result",
        "error_info",
        "created",
        "finished",
        "resident_on",
        "other_config",
    ),
}
_TABLES = {"host": "hosts", "SR": "srs", "VDI": "vdis", "task": "tasks"}


async def row_of(ctx: Context, cls: str, ref: Any) -> Row:
    """The `cls` object `ref` names; HANDLE_INVALID [class, ref] if there is none."""
    if not isinstance(ref, str):
        raise XapiError("HANDLE_INVALID", cls, str(ref))
    extra = " AND hidden = 0" if cls == "VDI" else ""
    row = await ctx.svc.db.fetchone(f"SELECT * FROM {_TABLES[cls]} WHERE ref = ?{extra}", ref)
    if row is None:
        raise XapiError("HANDLE_INVALID", cls, ref)
    return row


async def row_by_uuid(ctx: Context, cls: str, uuid: Any) -> Row:
    """The `cls` object with this uuid; UUID_INVALID [class, uuid] if none."""
    extra = " AND hidden = 0" if cls == "VDI" else ""
    row = await ctx.svc.db.fetchone(
        f"SELECT * FROM {_TABLES[cls]} WHERE uuid = ?{extra}", text(uuid, "uuid")
    )
    if row is None:
        raise XapiError("UUID_INVALID", cls, uuid)
    return row


async def record_of(ctx: Context, cls: str, ref: Any) -> dict:
    """The XenAPI record of the `cls` object `ref`."""
    view = RecordView(ctx.svc)
    if cls == "pool":
        pool_ref, record = await view.pool()
        if ref != pool_ref:
            raise XapiError("HANDLE_INVALID", cls, str(ref))
        return record
    return await getattr(view, cls.lower())(await row_of(ctx, cls, ref))


def _register_class(cls: str) -> None:
    """get_all, get_all_records, get_record, get_by_uuid and the field getters of `cls`."""

    async def get_all(ctx: Context) -> list[str]:
        return list(await RecordView(ctx.svc).all_of(cls))

    async def get_all_records(ctx: Context) -> dict[str, dict]:
        return await RecordView(ctx.svc).all_of(cls)

    async def get_record(ctx: Context, ref: Any) -> dict:
        return await record_of(ctx, cls, ref)

    async def get_by_uuid(ctx: Context, uuid: Any) -> str:
        if cls == "pool":
            for ref, record in (await RecordView(ctx.svc).all_of("pool")).items():
                if record["uuid"] == uuid:
                    return ref
            raise XapiError("UUID_INVALID", cls, str(uuid))
        return (await row_by_uuid(ctx, cls, uuid))["ref"]

    xapi(f"{cls}.get_all")(get_all)
    xapi(f"{cls}.get_all_records")(get_all_records)
    xapi(f"{cls}.get_record")(get_record)
    xapi(f"{cls}.get_by_uuid")(get_by_uuid)
    for name in GETTERS[cls]:
        xapi(f"{cls}.get_{name}")(_getter(cls, name))


def _getter(cls: str, name: str):
    async def get(ctx: Context, ref: Any) -> Any:
        return (await record_of(ctx, cls, ref))[name]

    return get


for _cls in GETTERS:
    _register_class(_cls)


# -- VDI operations ------------------------------------------------------------------------


def _served_here(ctx: Context, sr: Row) -> None:
    """A VDI operation runs on the host that can reach the SR's files."""
    owner = ctx.svc.srs.owner(sr)
    if owner is not None:
        raise XapiError(
            "OPERATION_NOT_ALLOWED",
            f"SR {sr['uuid']} is local to host {owner}: make this call on that host",
        )


@xapi("VDI.create", "operator")
async def vdi_create(ctx: Context, args: Any) -> str:
    """A new empty VDI from a VDI record (SR, name_label, virtual_size; sm_config's
    image-format, or type=raw, picks the runtime format)."""
    if not isinstance(args, dict):
        raise XapiError("FIELD_TYPE_ERROR", "args")
    if "SR" not in args:
        raise XapiError("FIELD_TYPE_ERROR", "SR")
    sr = await row_of(ctx, "SR", args["SR"])
    _served_here(ctx, sr)
    size = integer(args.get("virtual_size"), "virtual_size")
    sm_config = args.get("sm_config") or {}
    if not isinstance(sm_config, dict):
        raise XapiError("FIELD_TYPE_ERROR", "sm_config")
    fmt = sm_config.get("image-format") or ("raw" if sm_config.get("type") == "raw" else None)
    label = text(args.get("name_label", ""), "name_label")
    row = await ctx.svc.vdis.create(sr, label, size, fmt)
    return row["ref"]


async def _vdi_here(ctx: Context, ref: Any) -> Row:
    row = await row_of(ctx, "VDI", ref)
    _served_here(ctx, await ctx.svc.srs.get(row["sr"]))
    return row


@xapi("VDI.snapshot", "operator")
async def vdi_snapshot(ctx: Context, vdi: Any, driver_params: Any = None) -> str:
    """A read-only snapshot of the VDI; its ref."""
    row = await _vdi_here(ctx, vdi)
    return (await ctx.svc.vdis.snapshot(row["uuid"]))["ref"]


@xapi("VDI.clone", "operator")
async def vdi_clone(ctx: Context, vdi: Any, driver_params: Any = None) -> str:
    """A writable copy of the VDI; its ref."""
    row = await _vdi_here(ctx, vdi)
    return (await ctx.svc.vdis.clone(row["uuid"]))["ref"]


@xapi("VDI.destroy", "operator")
async def vdi_destroy(ctx: Context, vdi: Any) -> str:
    """Remove the VDI (a layer others read through stays hidden)."""
    row = await _vdi_here(ctx, vdi)
    await ctx.svc.vdis.delete(row["uuid"])
    return ""


@xapi("VDI.set_name_label", "operator")
async def vdi_set_name_label(ctx: Context, vdi: Any, value: Any) -> str:
    """Rename the VDI."""
    row = await row_of(ctx, "VDI", vdi)
    await ctx.svc.vdis.rename(row["uuid"], text(value, "value"))
    return ""


@xapi("VDI.enable_cbt", "operator")
async def vdi_enable_cbt(ctx: Context, vdi: Any) -> str:
    """Turn changed block tracking on for the VDI."""
    row = await _vdi_here(ctx, vdi)
    await ctx.svc.vdis.set_cbt(row["uuid"], True)
    return ""


@xapi("VDI.disable_cbt", "operator")
async def vdi_disable_cbt(ctx: Context, vdi: Any) -> str:
    """Turn changed block tracking off; the VDI's change log is discarded."""
    row = await _vdi_here(ctx, vdi)
    await ctx.svc.vdis.set_cbt(row["uuid"], False)
    return ""


@xapi("VDI.data_destroy", "operator")
async def vdi_data_destroy(ctx: Context, vdi: Any) -> str:
    """Release a tracked snapshot's data; its record stays, of type cbt_metadata."""
    row = await _vdi_here(ctx, vdi)
    await ctx.svc.vdis.data_destroy(row["uuid"])
    return ""


@xapi("VDI.list_changed_blocks")
async def vdi_list_changed_blocks(ctx: Context, vdi_from: Any, vdi_to: Any) -> str:
    """The 64 KiB blocks that differ between two versions of a disk: a base64 bitmap."""
    base = await _vdi_here(ctx, vdi_from)
    to = await _vdi_here(ctx, vdi_to)
    return base64.b64encode(await ctx.svc.vdis.changed_blocks(to, base)).decode("ascii")


# -- tasks ---------------------------------------------------------------------------------


@xapi("task.create", "operator")
async def task_create(ctx: Context, label: Any, description: Any = "") -> str:
    """A pending task to pass as task_id= to an import or export."""
    row = await ctx.svc.tasks.create(text(label, "label"), ctx.username)
    return row["ref"]


async def _owned_task(ctx: Context, ref: Any) -> Row:
    row = await row_of(ctx, "task", ref)
    assert ctx.principal is not None
    ctx.svc.tasks.check_owner(row, ctx.principal)
    return row


@xapi("task.cancel", "operator")
async def task_cancel(ctx: Context, task: Any) -> str:
    """Cancel the task, and stop its transfer on whichever host runs it."""
    row = await _owned_task(ctx, task)
    await ctx.svc.tasks.cancel(row["uuid"])
    return ""


@xapi("task.destroy", "operator")
async def task_destroy(ctx: Context, task: Any) -> str:
    """Forget a task that has no transfer running."""
    row = await _owned_task(ctx, task)
    await ctx.svc.tasks.destroy(row["uuid"])
    return ""


# -- events --------------------------------------------------------------------------------


@xapi("event.from")
async def event_from(ctx: Context, classes: Any, token: Any, timeout: Any) -> dict:
    """Changes of the watched classes after `token` (all objects, for an empty token),
    waiting up to `timeout` seconds for one."""
    return await watch.event_from(ctx.svc, classes, token, timeout)


# Python's XenAPI module sends event.from as `event_from` (`from` is a Python keyword).
xapi("event_from")(event_from)


@xapi("event.inject")
async def event_inject(ctx: Context, cls: Any, ref: Any) -> str:
    """A `mod` event for an object, as if it had changed; the token after it."""
    name = watch.class_name(text(cls, "class"))
    if name == "pool":  # Xen Orchestra starts its event loop with a mark on the pool
        uuid, pool_ref = await pool_identity(ctx.svc)
        if ref != pool_ref:
            raise XapiError("HANDLE_INVALID", "pool", str(ref))
    elif name in _TABLES:
        uuid = (await row_of(ctx, name, ref))["uuid"]
    else:
        raise XapiError("HANDLE_INVALID", str(cls), str(ref))
    await ctx.svc.events.record(name.lower(), uuid)
    return watch.token_of(await ctx.svc.events.latest())


@xapi("event.get_current_id")
async def event_current_id(ctx: Context) -> int:
    """The position of the newest change in the event log."""
    return await ctx.svc.events.latest()
