"""Hosts, SRs, VDIs and users as records (contract: Records, Error codes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ADMIN


async def json_of(resp, status):
    body = await resp.json()
    assert resp.status == status, body
    return body


async def assert_error(resp, status, code):
    body = await json_of(resp, status)
    assert set(body) == {"error", "message", "params"}
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


async def test_this_host(client):
    hosts = await json_of(await client.get("/hosts", headers=ADMIN), 200)
    assert len(hosts) == 1
    host = hosts[0]
    assert host["this_host"] is True and host["live"] is True
    assert host["name_label"] == "test-host"
    assert host["address"] == "http://127.0.0.1:8080"
    same = await json_of(await client.get(f"/hosts/{host['uuid']}", headers=ADMIN), 200)
    assert same == host


async def test_local_sr_created_on_first_start(client, config):
    srs = await json_of(await client.get("/srs", headers=ADMIN), 200)
    assert len(srs) == 1
    sr = srs[0]
    assert sr["name_label"] == "Local storage"
    assert sr["type"] == "local" and sr["shared"] is False
    assert sr["supported_image_formats"] == ["raw", "vhd", "qcow2"]
    assert sr["default_image_format"] == "raw"
    assert sr["ref"].startswith("OpaqueRef:")
    assert sr["physical_size"] > 0 and sr["physical_utilisation"] == 0
    assert (config.state_dir / "srs" / sr["uuid"]).is_dir()
    for ident in (sr["uuid"], sr["ref"]):
        assert (await json_of(await client.get(f"/srs/{ident}", headers=ADMIN), 200)) == sr
    await assert_error(await client.get("/srs/nope", headers=ADMIN), 404, "SR_NOT_FOUND")


async def test_vdi_create_get_list_delete(client, config):
    sr = (await json_of(await client.get("/srs", headers=ADMIN), 200))[0]
    resp = await client.post(
        "/vdis",
        json={"sr": sr["uuid"], "name_label": "disk", "virtual_size": 10 * 2**30},
        headers=ADMIN,
    )
    vdi = await json_of(resp, 201)
    assert vdi["ref"].startswith("OpaqueRef:") and vdi["ref"] != f"OpaqueRef:{vdi['uuid']}"
    assert vdi["name_label"] == "disk" and vdi["sr"] == sr["uuid"]
    assert vdi["virtual_size"] == 10 * 2**30
    assert vdi["physical_utilisation"] == 0
    assert vdi["image_format"] == "raw"
    assert vdi["read_only"] is False and vdi["is_a_snapshot"] is False
    assert vdi["snapshot_of"] is None and vdi["parent"] is None
    assert vdi["backing_chain"] == [{"uuid": vdi["uuid"], "image_format": "raw"}]
    assert vdi["created"].endswith("Z")

    path = config.state_dir / "srs" / sr["uuid"] / f"{vdi['uuid']}.raw"
    st = os.stat(path)
    assert st.st_size == 10 * 2**30 and st.st_blocks == 0  # sparse

    for ident in (vdi["uuid"], vdi["ref"]):
        assert (await json_of(await client.get(f"/vdis/{ident}", headers=ADMIN), 200)) == vdi
    listed = await json_of(await client.get("/vdis", headers=ADMIN), 200)
    assert [v["uuid"] for v in listed] == [vdi["uuid"]]
    by_sr = await json_of(await client.get("/vdis", params={"sr": sr["ref"]}, headers=ADMIN), 200)
    assert by_sr == listed

    assert (await client.delete(f"/vdis/{vdi['ref']}", headers=ADMIN)).status == 204
    assert not path.exists()
    await assert_error(
        await client.get(f"/vdis/{vdi['uuid']}", headers=ADMIN), 404, "VDI_NOT_FOUND"
    )
    await assert_error(
        await client.delete(f"/vdis/{vdi['uuid']}", headers=ADMIN), 404, "VDI_NOT_FOUND"
    )


async def test_vdi_defaults_and_sizes(client):
    # No sr: this host's local SR. Sizes with units; rounded up to whole sectors.
    vdi = await json_of(
        await client.post("/vdis", json={"virtual_size": "1GiB"}, headers=ADMIN), 201
    )
    assert vdi["virtual_size"] == 2**30 and vdi["name_label"] == ""
    vdi = await json_of(await client.post("/vdis", json={"virtual_size": 1000}, headers=ADMIN), 201)
    assert vdi["virtual_size"] == 1024


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({}, 400, "BAD_REQUEST"),
        ({"virtual_size": -1}, 400, "BAD_REQUEST"),
        ({"virtual_size": 0}, 400, "BAD_REQUEST"),
        ({"virtual_size": "lots"}, 400, "BAD_REQUEST"),
        ({"virtual_size": True}, 400, "BAD_REQUEST"),
        ({"virtual_size": 1024, "name_label": 7}, 400, "BAD_REQUEST"),
        ({"virtual_size": 1024, "sr": "no-such-sr"}, 404, "SR_NOT_FOUND"),
        ({"virtual_size": 1024, "image_format": "vmdk"}, 415, "FORMAT_UNSUPPORTED"),
        ({"virtual_size": 2**70}, 400, "BAD_REQUEST"),
    ],
)
async def test_vdi_create_errors(client, config, body, status, code):
    await assert_error(await client.post("/vdis", json=body, headers=ADMIN), status, code)
    assert (await json_of(await client.get("/vdis", headers=ADMIN), 200)) == []
    leftovers = [
        p
        for p in (config.state_dir / "srs").rglob("*")
        if p.is_file() and p.name != ".vdi-transfer-sr"  # the SR's own marker
    ]
    assert leftovers == []


async def test_unsupported_format_names_the_srs_formats(client):
    body = await assert_error(
        await client.post(
            "/vdis", json={"virtual_size": 1024, "image_format": "vmdk"}, headers=ADMIN
        ),
        415,
        "FORMAT_UNSUPPORTED",
    )
    assert "raw, vhd, qcow2" in body["message"]


JSON = {**ADMIN, "Content-Type": "application/json"}


async def test_malformed_json_body(client):
    resp = await client.post("/vdis", data=b"{not json", headers=JSON)
    await assert_error(resp, 400, "BAD_REQUEST")
    resp = await client.post("/vdis", data=b"[1, 2]", headers=JSON)
    await assert_error(resp, 400, "BAD_REQUEST")
    # Nested deeper than the decoder recurses: a clear 400, not a 500 RecursionError.
    resp = await client.post("/vdis", data=b"[" * 100_000, headers=JSON)
    body = await assert_error(resp, 400, "BAD_REQUEST")
    assert "nested too deeply" in body["message"]
    resp = await client.post("/vdis", data=b'{"a": ' * 100_000, headers=JSON)
    await assert_error(resp, 400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_json_body_must_say_it_is_json(client, ctype):
    """The content types a cross-site form or a simple fetch can send are refused."""
    headers = {**ADMIN, "Content-Type": ctype} if ctype else ADMIN
    resp = await client.post("/vdis", data=b'{"virtual_size": 512}', headers=headers)
    body = await assert_error(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert "application/json" in body["message"]
    assert (await json_of(await client.get("/vdis", headers=ADMIN), 200)) == []
    vendor = {**ADMIN, "Content-Type": "application/vnd.example+json; charset=utf-8"}
    resp = await client.post("/vdis", data=b'{"virtual_size": 512}', headers=vendor)
    await json_of(resp, 201)


async def test_json_body_too_large(client):
    resp = await client.post("/vdis", data=b" " * (1 << 20) + b"{}", headers=JSON)
    await assert_error(resp, 413, "BAD_REQUEST")


async def test_vdi_in_use_cannot_be_deleted(client):
    app = client.server.app
    from transfer.services import SERVICES

    svc = app[SERVICES]
    vdi = await json_of(await client.post("/vdis", json={"virtual_size": 4096}, headers=ADMIN), 201)
    await svc.vdis.lock(vdi["uuid"], "some-task")
    body = await assert_error(
        await client.delete(f"/vdis/{vdi['uuid']}", headers=ADMIN), 409, "VDI_IN_USE"
    )
    assert "some-task" in body["message"]
    with pytest.raises(Exception) as err:
        await svc.vdis.lock(vdi["uuid"], "other-task")
    assert err.value.code == "VDI_IN_USE"
    await svc.vdis.unlock(vdi["uuid"], "some-task")
    assert (await client.delete(f"/vdis/{vdi['uuid']}", headers=ADMIN)).status == 204


async def test_physical_utilisation_counts_real_blocks(client, config):
    vdi = await json_of(
        await client.post("/vdis", json={"virtual_size": "64M"}, headers=ADMIN), 201
    )
    sr = (await json_of(await client.get("/srs", headers=ADMIN), 200))[0]
    path = Path(config.state_dir / "srs" / sr["uuid"] / f"{vdi['uuid']}.raw")
    with path.open("r+b") as f:
        f.seek(2**20)
        f.write(os.urandom(2**20))
    vdi = await json_of(await client.get(f"/vdis/{vdi['uuid']}", headers=ADMIN), 200)
    assert 2**20 <= vdi["physical_utilisation"] < 2 * 2**20
    sr = (await json_of(await client.get("/srs", headers=ADMIN), 200))[0]
    assert sr["physical_utilisation"] == vdi["physical_utilisation"]


async def test_users_api(client):
    users = await json_of(await client.get("/users", headers=ADMIN), 200)
    assert users == [{"username": "admin", "role": "admin"}]
    resp = await client.post(
        "/users",
        json={"username": "bob", "password": "bob-password", "role": "operator"},
        headers=ADMIN,
    )
    assert (await json_of(resp, 201)) == {"username": "bob", "role": "operator"}
    resp = await client.post(
        "/users", json={"username": "bob", "password": "bob-password"}, headers=ADMIN
    )
    await assert_error(resp, 409, "USER_EXISTS")
    for bad in (
        {"username": "x y", "password": "long-enough"},
        {"username": "carol", "password": "short"},
        {"username": "carol", "password": "long-enough", "role": "root"},
        {"password": "long-enough"},
    ):
        await assert_error(await client.post("/users", json=bad, headers=ADMIN), 400, "BAD_REQUEST")
    users = await json_of(await client.get("/users", headers=ADMIN), 200)
    assert users == [
        {"username": "admin", "role": "admin"},
        {"username": "bob", "role": "operator"},
    ]
    assert "password" not in str(users) and "scrypt" not in str(users)
    assert (await client.delete("/users/bob", headers=ADMIN)).status == 204
    await assert_error(await client.delete("/users/bob", headers=ADMIN), 404, "USER_NOT_FOUND")


async def test_last_admin_cannot_be_removed_or_demoted(client):
    await assert_error(await client.delete("/users/admin", headers=ADMIN), 400, "BAD_REQUEST")
    await assert_error(
        await client.patch("/users/admin", json={"role": "reader"}, headers=ADMIN),
        400,
        "BAD_REQUEST",
    )
    await client.post(
        "/users",
        json={"username": "root2", "password": "root2-password", "role": "admin"},
        headers=ADMIN,
    )
    assert (await client.delete("/users/root2", headers=ADMIN)).status == 204


async def test_method_not_allowed_is_json(client):
    resp = await client.put("/vdis", headers=ADMIN)
    await assert_error(resp, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in resp.headers["Allow"]


async def test_import_into_read_only_vdi_is_refused(client):
    """Snapshots (a later issue) are read-only; the import checks the flag before any body."""
    from transfer.services import SERVICES

    vdi = await json_of(await client.post("/vdis", json={"virtual_size": 4096}, headers=ADMIN), 201)
    await client.server.app[SERVICES].db.execute(
        "UPDATE vdis SET read_only = 1 WHERE uuid = ?", vdi["uuid"]
    )
    resp = await client.put(f"/import_raw_vdi?vdi={vdi['uuid']}", data=b"x" * 512, headers=ADMIN)
    await assert_error(resp, 409, "VDI_READ_ONLY")
    tasks = await json_of(await client.get("/tasks", headers=ADMIN), 200)
    assert tasks == []
