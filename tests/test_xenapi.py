"""XenAPI compatibility, driven by a client nobody here wrote: the `XenAPI` module from PyPI
(XML-RPC), as backup scripts use it, against the real server; and the JSON-RPC and XML-RPC
wire forms checked byte for byte where XAPI's clients depend on them."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
import xmlrpc.client

import pytest
import XenAPI

from tests.conftest import ADMIN_PASSWORD
from tests.rawclient import api

MiB = 1 << 20


@pytest.fixture(scope="module")
def xen(shared_server):
    """A logged-in XenAPI session (XML-RPC, as XenAPI.py speaks it)."""
    session = XenAPI.Session(shared_server.url)
    session.xenapi.login_with_password("admin", ADMIN_PASSWORD, "2.21", "vdi-transfer tests")
    yield session
    session.xenapi.session.logout()


def http(url: str, method: str = "GET", data: bytes | None = None, headers=None):
    """(status, headers, body) of a plain urllib request: credentials only in the URL."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def post(url: str, body: bytes, ctype: str):
    return http(url, "POST", body, {"Content-Type": ctype})


def jsonrpc(base: str, method: str, params: list, version: str | None = "2.0"):
    request = {"method": method, "params": params, "id": 7}
    if version:
        request["jsonrpc"] = version
    status, headers, body = post(
        f"{base}/jsonrpc", json.dumps(request).encode(), "application/json"
    )
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"  # exactly: xen-api compares it
    return json.loads(body)


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as caught:
        call(*args)
    return caught.value.details


def local_sr(xen) -> str:
    pool = next(iter(xen.xenapi.pool.get_all_records().values()))
    return pool["default_SR"]


def new_vdi(xen, size: int = 4 * MiB, **sm_config) -> str:
    return xen.xenapi.VDI.create(
        {
            "SR": local_sr(xen),
            "name_label": "xenapi test",
            "name_description": "",
            "virtual_size": str(size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
            "sm_config": sm_config,
        }
    )


def wait_task(xen, task: str, timeout: float = 30) -> dict:
    """Wait for the task the way XAPI clients do: event.from on the task class."""
    token = xen.xenapi.event_from(["task"], "", 0)["token"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = xen.xenapi.task.get_record(task)
        if record["status"] not in ("pending", "cancelling"):
            return record
        token = xen.xenapi.event_from(["task"], token, 5.0)["token"]
    raise AssertionError(f"task {task} still pending")


# -- the SDK -------------------------------------------------------------------------------


def test_records_as_xapi_writes_them(xen, shared_server):
    x = xen.xenapi
    pool_ref, pool = next(iter(x.pool.get_all_records().items()))
    assert x.pool.get_all() == [pool_ref]
    host_ref = pool["master"]
    host = x.host.get_record(host_ref)
    assert host["address"] == "127.0.0.1" and host["API_version_major"] == "2"
    assert x.host.get_by_uuid(host["uuid"]) == host_ref
    assert host_ref in x.host.get_all_records()
    sr = x.SR.get_record(pool["default_SR"])
    assert sr["name_label"] == "Local storage"
    assert int(sr["physical_size"]) > 0 and isinstance(sr["physical_size"], str)
    assert x.SR.get_by_uuid(sr["uuid"]) == pool["default_SR"]
    assert x.SR.get_uuid(pool["default_SR"]) == sr["uuid"]

    vdi = new_vdi(xen, 2 * MiB, **{"image-format": "vhd"})
    record = x.VDI.get_record(vdi)
    assert record["virtual_size"] == str(2 * MiB)  # int64s travel as strings
    assert record["SR"] == pool["default_SR"] and vdi in x.SR.get_VDIs(pool["default_SR"])
    assert record["sm_config"]["image-format"] == "vhd"
    assert record["is_a_snapshot"] is False and record["snapshot_of"] == "OpaqueRef:NULL"
    assert record["name_description"] == ""
    assert x.VDI.get_by_uuid(record["uuid"]) == vdi
    assert x.VDI.get_uuid(vdi) == record["uuid"]
    assert x.VDI.get_virtual_size(vdi) == str(2 * MiB)
    assert vdi in x.VDI.get_all() and vdi in x.VDI.get_all_records()
    # The same VDI through the HTTP API: one ref for both.
    status, rest = api(f"{shared_server.url}/vdis/{record['uuid']}")
    assert status == 200 and rest["ref"] == vdi

    snap = x.VDI.snapshot(vdi, {})
    snap_record = x.VDI.get_record(snap)
    assert snap_record["is_a_snapshot"] is True and snap_record["read_only"] is True
    assert snap_record["snapshot_of"] == vdi and x.VDI.get_snapshots(vdi) == [snap]
    # The VDI now writes into a layer over the snapshot's, and says so as XAPI does.
    assert x.VDI.get_sm_config(vdi)["vhd-parent"] == snap_record["uuid"]
    clone = x.VDI.clone(snap, {})
    assert x.VDI.get_record(clone)["read_only"] is False
    assert failure(x.VDI.destroy, "OpaqueRef:nothing") == [
        "HANDLE_INVALID",
        "VDI",
        "OpaqueRef:nothing",
    ]
    x.VDI.destroy(clone)
    assert failure(x.VDI.get_record, clone)[:2] == ["HANDLE_INVALID", "VDI"]
    assert failure(x.VDI.get_by_uuid, "nope")[:2] == ["UUID_INVALID", "VDI"]
    # Async calls answer a task at once; the task carries the result, or the error.
    task = x.Async.VDI.snapshot(vdi, {})
    record = wait_task(xen, task)
    assert record["status"] == "success" and record["name_label"] == "Async.VDI.snapshot"
    made = record["result"].removeprefix("<value>").removesuffix("</value>")
    assert x.VDI.get_snapshot_of(made) == vdi and made in x.VDI.get_snapshots(vdi)
    record = wait_task(xen, x.Async.VDI.destroy("OpaqueRef:nothing"))
    assert record["status"] == "failure"
    assert record["error_info"] == ["HANDLE_INVALID", "VDI", "OpaqueRef:nothing"]
    methods = x.system.listMethods()
    assert "VDI.get_record" in methods and "event.from" in methods


def test_import_under_a_task_waited_for_with_event_from(xen, shared_server, tmp_path):
    """The loop of a XAPI backup tool: VDI.create, task.create, PUT with session_id and
    task_id as refs, event_from until the task is done, then the result and the bytes."""
    x = xen.xenapi
    data = os.urandom(3 * MiB) + bytes(MiB)
    vdi = new_vdi(xen, len(data))
    task = x.task.create("import", "a disk from a backup")
    assert x.task.get_status(task) == "pending"
    session = xen._session
    base = shared_server.url
    # The empty probe xen-api sends first: answered, and nothing happens to the task.
    status, _, _ = http(
        f"{base}/import_raw_vdi/?session_id={session}&task_id={task}&vdi={vdi}", "PUT", b""
    )
    assert status == 200 and x.task.get_status(task) == "pending"

    waiter: dict = {}

    def wait() -> None:
        waiter["record"] = wait_task(xen, task)
        waiter["at"] = time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    status, headers, body = http(
        f"{base}/import_raw_vdi/disk.raw?session_id={session}&task_id={task}&vdi={vdi}&format=raw",
        "PUT",
        data,
    )
    done = time.monotonic()
    assert status == 200, body
    assert headers["task-id"] == task
    thread.join(30)
    record = waiter["record"]
    assert record["status"] == "success" and float(record["progress"]) == 1.0
    assert record["result"] == f"<value>{vdi}</value>"  # as XAPI writes it
    assert x.task.get_result(task) == f"<value>{vdi}</value>"
    assert x.task.get_error_info(task) == []
    assert waiter["at"] - done < 3.0  # event_from woke, it did not sleep out its timeout
    # The export runs under a task of the client's too, and completes it.
    reading = x.task.create("export", "")
    status, headers, exported = http(
        f"{base}/export_raw_vdi/?session_id={session}&vdi={vdi}&task_id={reading}"
    )
    assert status == 200 and hashlib.sha256(exported).digest() == hashlib.sha256(data).digest()
    assert headers["task-id"] == reading
    assert wait_task(xen, reading)["status"] == "success"
    x.task.destroy(task)
    assert failure(x.task.get_record, task)[:2] == ["HANDLE_INVALID", "task"]


def test_a_failed_import_fails_its_task_with_xapi_error_info(xen, shared_server):
    x = xen.xenapi
    vdi = new_vdi(xen, MiB)
    task = x.task.create("too big", "")
    status, _, body = http(
        f"{shared_server.url}/import_raw_vdi?session_id={xen._session}&task_id={task}"
        f"&vdi={vdi}&format=vhd",
        "PUT",
        b"not a vhd" * 100,
    )
    assert status == 400, body
    record = wait_task(xen, task)
    assert record["status"] == "failure" and record["error_info"][0] == "IMAGE_INVALID"


def test_a_refused_transfer_fails_the_task_its_client_waits_for(xen, shared_server):
    """XAPI fails the task of a request it refuses; a client waiting for the task with
    event.from would otherwise wait forever."""
    x = xen.xenapi
    base, session = shared_server.url, xen._session
    vdi = new_vdi(xen, MiB)
    task = x.task.create("too big", "")
    status, _, _ = http(
        f"{base}/import_raw_vdi?session_id={session}&task_id={task}&vdi={vdi}",
        "PUT",
        bytes(2 * MiB),
    )
    assert status == 413
    assert wait_task(xen, task)["error_info"][0] == "VDI_TOO_SMALL"
    task = x.task.create("no such format", "")
    status, _, _ = http(
        f"{base}/import_raw_vdi?session_id={session}&task_id={task}&vdi={vdi}&format=iso",
        "PUT",
        bytes(MiB),
    )
    assert status == 415
    assert wait_task(xen, task)["error_info"][0] == "FORMAT_UNSUPPORTED"
    task = x.task.create("export of nothing", "")
    status, _, _ = http(f"{base}/export_raw_vdi?session_id={session}&task_id={task}&vdi=nope")
    assert status == 404
    assert wait_task(xen, task)["error_info"][0] == "VDI_NOT_FOUND"
    task = x.task.create("out of range", "")
    status, _, _ = http(
        f"{base}/export_raw_vdi?session_id={session}&task_id={task}&vdi={vdi}",
        headers={"Range": f"bytes={2 * MiB}-"},
    )
    assert status == 416
    assert wait_task(xen, task)["error_info"][0] == "RANGE_NOT_SATISFIABLE"


def test_cancel_and_events_of_the_task_class(xen):
    x = xen.xenapi
    first = x.event_from(["task"], "", 0)
    assert set(first) == {"events", "valid_ref_counts", "token"}
    task = x.task.create("cancel me", "")
    changed = x.event_from(["task"], first["token"], 10.0)
    assert [(e["operation"], e["ref"]) for e in changed["events"]] == [("add", task)]
    assert changed["events"][0]["class"] == "task"
    assert changed["events"][0]["snapshot"]["status"] == "pending"
    x.task.cancel(task)
    cancelled = x.event_from([f"task/{task}"], changed["token"], 10.0)
    assert [e["snapshot"]["status"] for e in cancelled["events"]] == ["cancelled"]
    assert x.task.get_error_info(task) == ["CANCELLED"]
    x.task.destroy(task)
    gone = x.event_from(["task"], cancelled["token"], 10.0)
    assert [(e["operation"], e["ref"]) for e in gone["events"]] == [("del", task)]
    # Nothing happens: the call waits its timeout and answers the same token.
    started = time.monotonic()
    quiet = x.event_from(["task"], gone["token"], 1.0)
    assert quiet["events"] == [] and quiet["token"] == gone["token"]
    assert 0.9 < time.monotonic() - started < 5
    injected = x.event.inject("VDI", new_vdi(xen, MiB))
    assert injected.isdigit()
    assert failure(x.event_from, ["task"], "garbage", 1.0)[0] == "EVENT_FROM_TOKEN_PARSE_FAILURE"


def test_sessions_are_one_across_rpc_and_http(shared_server):
    base = shared_server.url
    status, login = api(f"{base}/session", "POST")
    assert status == 200
    # A session from POST /session drives the RPC ...
    refs = jsonrpc(base, "VDI.get_all", [login["session_id"]])
    assert isinstance(refs["result"], list)
    # ... and one from the RPC drives HTTP, until it is logged out.
    session = XenAPI.Session(base)
    session.xenapi.login_with_password("admin", ADMIN_PASSWORD)
    token = session._session
    status, _, body = http(f"{base}/session?session_id={token}")
    assert status == 200 and json.loads(body)["username"] == "admin"
    session.xenapi.session.logout()
    status, _, body = http(f"{base}/session?session_id={token}")
    assert status == 401 and json.loads(body)["error"] == "SESSION_INVALID"
    answer = jsonrpc(base, "VDI.get_all", [token])
    assert answer["error"] == {"code": 1, "message": "SESSION_INVALID", "data": [token]}


def test_bad_logins_and_roles(shared_server):
    base = shared_server.url
    bad = XenAPI.Session(base)
    with pytest.raises(XenAPI.Failure) as caught:
        bad.xenapi.login_with_password("admin", "wrong password")
    assert caught.value.details[:2] == ["SESSION_AUTHENTICATION_FAILED", "admin"]
    status, _ = api(
        f"{base}/users", "POST", {"username": "xreader", "password": "reader-pw1", "role": "reader"}
    )
    assert status == 201
    reader = XenAPI.Session(base)
    reader.xenapi.login_with_password("xreader", "reader-pw1")
    assert reader.xenapi.SR.get_all()  # reading is allowed
    sr = reader.xenapi.SR.get_all()[0]
    denied = failure(reader.xenapi.VDI.create, {"SR": sr, "virtual_size": "1048576"})
    assert denied[:2] == ["RBAC_PERMISSION_DENIED", "VDI.create"]
    assert failure(reader.xenapi.task.create, "x", "")[0] == "RBAC_PERMISSION_DENIED"
    reader.xenapi.session.logout()


# -- the wire ------------------------------------------------------------------------------


def test_jsonrpc_shapes(shared_server):
    base = shared_server.url
    login = jsonrpc(base, "session.login_with_password", ["admin", ADMIN_PASSWORD, "2.21"])
    assert set(login) == {"jsonrpc", "result", "id"} and login["id"] == 7
    session = login["result"]
    records = jsonrpc(base, "SR.get_all_records", [session])["result"]
    sr = next(iter(records.values()))
    assert isinstance(sr["physical_size"], int)  # JSON keeps numbers numbers
    assert jsonrpc(base, "no.such_method", [session])["error"] == {
        "code": 1,
        "message": "MESSAGE_METHOD_UNKNOWN",
        "data": ["no.such_method"],
    }
    assert jsonrpc(base, "VDI.get_record", [session])["error"]["data"] == [
        "VDI.get_record",
        "2",
        "1",
    ]
    # JSON-RPC 1.0: result and error both present, one of them null.
    old = jsonrpc(base, "VDI.get_record", [session, "OpaqueRef:x"], version=None)
    assert old["result"] is None and old["error"] == ["HANDLE_INVALID", "VDI", "OpaqueRef:x"]
    # Version 2.0 params may be one struct, or absent, as XAPI reads them.
    status, _, body = post(
        f"{base}/jsonrpc",
        json.dumps({"jsonrpc": "2.0", "method": "system.listMethods", "id": 1}).encode(),
        "application/json",
    )
    assert "VDI.create" in json.loads(body)["result"]
    # A case-insensitive class name, as XAPI accepts.
    assert jsonrpc(base, "vdi.get_all", [session])["result"] is not None
    status, headers, body = post(f"{base}/jsonrpc", b"{not json", "application/json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["code"] == -32700
    status, _, body = post(f"{base}/jsonrpc", b"[1, 2]", "application/json")
    assert json.loads(body)["error"]["code"] == -32600
    status, _, body = post(f"{base}/jsonrpc", b"[" * 100000, "application/json")
    assert status == 200 and json.loads(body)["error"]["code"] == -32700
    status, _, _ = post(f"{base}/jsonrpc", b" " * (2 * MiB), "application/json")
    assert status == 413


def test_xmlrpc_wire_form(shared_server):
    base = shared_server.url
    call = xmlrpc.client.dumps(("admin", ADMIN_PASSWORD), "session.login_with_password")
    for path in ("/", "/RPC2", "/xmlrpc"):
        status, headers, body = post(base + path, call.encode(), "text/xml")
        assert status == 200 and headers["Content-Type"].startswith("text/xml")
        assert body.startswith(
            b'<?xml version="1.0"?><methodResponse><params><param><value><struct>'
        ), body
        session = xmlrpc.client.loads(body)[0][0]["Value"]
    fetch = xmlrpc.client.dumps((session,), "pool.get_all_records").encode()
    _, _, body = post(base + "/", fetch, "text/xml")
    assert b"<member><name>name_label</name><value></value></member>" in body  # ""
    fetch = xmlrpc.client.dumps((session,), "SR.get_all_records").encode()
    _, _, body = post(base + "/", fetch, "text/xml")
    assert b"<name>physical_size</name><value>" in body and b"<int>" not in body
    assert b"\n" not in body  # compact, as XAPI writes it
    # Control characters XML cannot carry are dropped, not sent to break the client.
    sr = next(iter(jsonrpc(base, "SR.get_all", [session])["result"]))
    vdi = jsonrpc(base, "VDI.create", [session, {"SR": sr, "virtual_size": 1 << 20}])["result"]
    assert jsonrpc(base, "VDI.set_name_label", [session, vdi, "bell\x07 <&>"])["result"] == ""
    _, _, body = post(
        base + "/", xmlrpc.client.dumps((session, vdi), "VDI.get_record").encode(), "text/xml"
    )
    assert xmlrpc.client.loads(body)[0][0]["Value"]["name_label"] == "bell <&>"
    # What is not a call at all gets an XML-RPC fault; a bomb is refused before parsing.
    for junk in (
        b"<methodCall><methodName>x",
        b"not xml",
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">]><methodCall/>',
        b"<methodResponse><params></params></methodResponse>",
    ):
        status, _, body = post(base + "/", junk, "text/xml")
        assert status == 200
        with pytest.raises(xmlrpc.client.Fault):
            xmlrpc.client.loads(body)
    status, _, _ = post(base + "/RPC2", b"<" * (2 * MiB), "text/xml")
    assert status == 413


def test_changed_block_tracking_through_the_rpc(xen, shared_server):
    """VDI.enable_cbt, list_changed_blocks between two snapshots (a base64 bitmap, XAPI's
    encoding) and disable_cbt, as a CBT-based backup tool calls them."""
    import base64

    from tests.rawclient import frame

    x = xen.xenapi
    vdi = new_vdi(xen, 4 * MiB, **{"image-format": "qcow2"})
    x.VDI.enable_cbt(vdi)
    assert x.VDI.get_cbt_enabled(vdi) is True
    before = x.VDI.snapshot(vdi, {})
    body = frame(3 * (64 << 10), os.urandom(512)) + bytes(12)
    status, _, _ = http(
        f"{shared_server.url}/import_raw_vdi?session_id={xen._session}&vdi={vdi}&chunked=true",
        "PUT",
        body,
    )
    assert status == 200
    after = x.VDI.snapshot(vdi, {})
    bitmap = base64.b64decode(x.VDI.list_changed_blocks(before, after))
    assert len(bitmap) == 8 and bitmap[0] == 0b00010000 and not any(bitmap[1:])
    x.VDI.disable_cbt(vdi)
    assert x.VDI.get_cbt_enabled(vdi) is False
    assert failure(x.VDI.list_changed_blocks, before, vdi)[0] == "VDI_NO_CBT_METADATA"
