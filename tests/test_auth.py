"""Every way in, and every way of being kept out (contract: Authentication)."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.conftest import ADMIN, ADMIN_PASSWORD, basic
from transfer.services import SERVICES


async def login(client, headers=None, **body):
    resp = await client.post("/session", headers=headers or {}, json=body or None)
    return resp, await resp.json()


async def assert_401(resp, code):
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="vdi-transfer"'
    body = await resp.json()
    assert body["error"] == code, body
    assert body["message"]
    return body


async def test_health_needs_no_auth(client):
    resp = await client.get("/health")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"


async def test_no_credentials_is_session_invalid(client):
    await assert_401(await client.get("/vdis"), "SESSION_INVALID")


async def test_basic_auth(client):
    resp = await client.get("/vdis", headers=ADMIN)
    assert resp.status == 200
    # The second request is served from the verified-credentials cache: same answer.
    assert (await client.get("/vdis", headers=ADMIN)).status == 200


async def test_basic_wrong_password_and_unknown_user(client):
    await assert_401(
        await client.get("/vdis", headers=basic("admin", "nope-nope")),
        "SESSION_AUTHENTICATION_FAILED",
    )
    await assert_401(
        await client.get("/vdis", headers=basic("ghost", ADMIN_PASSWORD)),
        "SESSION_AUTHENTICATION_FAILED",
    )


async def test_malformed_basic(client):
    resp = await client.get("/vdis", headers={"Authorization": "Basic !!!not-base64"})
    await assert_401(resp, "SESSION_AUTHENTICATION_FAILED")
    resp = await client.get("/vdis", headers={"Authorization": "Digest x"})
    await assert_401(resp, "SESSION_INVALID")


async def test_login_with_basic_and_json(client):
    resp, body = await login(client, headers=ADMIN)
    assert resp.status == 200
    assert body["session_id"] and body["expires_at"].endswith("Z")
    cookie = resp.cookies["session_id"]
    assert cookie.value == body["session_id"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict"

    resp, body = await login(client, username="admin", password=ADMIN_PASSWORD)
    assert resp.status == 200 and body["role"] == "admin"

    resp, body = await login(client, username="admin", password="wrong-password")
    await assert_401(resp, "SESSION_AUTHENTICATION_FAILED")
    resp, body = await login(client)
    await assert_401(resp, "SESSION_AUTHENTICATION_FAILED")


async def test_session_by_query_cookie_and_bearer(client):
    _, body = await login(client, headers=ADMIN)
    sid = body["session_id"]
    client.session.cookie_jar.clear()
    assert (await client.get("/vdis", params={"session_id": sid})).status == 200
    assert (await client.get("/vdis", headers={"Authorization": f"Bearer {sid}"})).status == 200
    assert (await client.get("/vdis", cookies={"session_id": sid})).status == 200
    resp = await client.get("/session", headers={"Authorization": f"Bearer {sid}"})
    assert (await resp.json()) == {"username": "admin", "role": "admin", "via": "session"}


async def test_cookie_set_by_login_authenticates_later_requests(client):
    await login(client, headers=ADMIN)
    assert (await client.get("/tasks")).status == 200  # the jar sends the cookie


async def test_garbage_session(client):
    client.session.cookie_jar.clear()
    await assert_401(await client.get("/vdis", params={"session_id": "garbage"}), "SESSION_INVALID")
    await assert_401(
        await client.get("/vdis", headers={"Authorization": "Bearer a.b.c"}), "SESSION_INVALID"
    )


def signing_key(client) -> bytes:
    """The key this server signs sessions with (state dir, or the pool's database)."""
    return client.server.app[SERVICES].auth.signer._secret


def _claims(**over):
    now = int(time.time())
    return {"typ": "session", "sub": "admin", "jti": "j-1", "iat": now, "exp": now + 60, **over}


async def test_expired_jwt(client, config):
    secret = signing_key(client)
    token = jwt.encode(_claims(exp=int(time.time()) - 5), secret, algorithm="HS256")
    body = await assert_401(
        await client.get("/vdis", params={"session_id": token}), "SESSION_INVALID"
    )
    assert "expired" in body["message"]


async def test_jwt_alg_none_rejected(client):
    token = jwt.encode(_claims(), None, algorithm="none")
    await assert_401(await client.get("/vdis", params={"session_id": token}), "SESSION_INVALID")
    # Also a hand-made one with a dangling empty signature.
    header_payload = token.rsplit(".", 1)[0]
    await assert_401(
        await client.get("/vdis", params={"session_id": header_payload + "."}), "SESSION_INVALID"
    )


async def test_jwt_signed_with_another_key(client):
    token = jwt.encode(_claims(), b"k" * 32, algorithm="HS256")
    await assert_401(await client.get("/vdis", params={"session_id": token}), "SESSION_INVALID")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_jwt_other_algorithm_with_right_key_rejected(client, config):
    secret = signing_key(client)
    token = jwt.encode(_claims(), secret, algorithm="HS512")
    await assert_401(await client.get("/vdis", params={"session_id": token}), "SESSION_INVALID")


async def test_jwt_right_key_is_accepted(client, config):
    """The control for the forgeries above: a well-formed token with the pool key works."""
    secret = signing_key(client)
    token = jwt.encode(_claims(), secret, algorithm="HS256")
    assert (await client.get("/vdis", params={"session_id": token})).status == 200


async def test_logout_revokes_everywhere(client):
    _, body = await login(client, headers=ADMIN)
    sid = body["session_id"]
    client.session.cookie_jar.clear()
    bearer = {"Authorization": f"Bearer {sid}"}
    resp = await client.delete("/session", headers=bearer)
    assert resp.status == 204
    for kwargs in (
        {"headers": bearer},
        {"params": {"session_id": sid}},
        {"cookies": {"session_id": sid}},
    ):
        body = await assert_401(await client.get("/vdis", **kwargs), "SESSION_INVALID")
        assert "logged out" in body["message"]


async def test_logout_with_basic_only_is_refused(client):
    resp = await client.delete("/session", headers=ADMIN)
    await assert_401(resp, "SESSION_INVALID")


async def test_session_of_removed_user_is_invalid(client, users):
    _, body = await login(client, headers=users["operator"])
    sid = body["session_id"]
    assert (await client.delete("/users/oper", headers=ADMIN)).status == 204
    await assert_401(await client.get("/vdis", params={"session_id": sid}), "SESSION_INVALID")


async def test_password_change_invalidates_cached_basic(client, users):
    assert (await client.get("/vdis", headers=users["operator"])).status == 200
    resp = await client.patch("/users/oper", json={"password": "new-password!"}, headers=ADMIN)
    assert resp.status == 200
    await assert_401(
        await client.get("/vdis", headers=users["operator"]), "SESSION_AUTHENTICATION_FAILED"
    )
    assert (await client.get("/vdis", headers=basic("oper", "new-password!"))).status == 200


async def test_roles(client, users):
    reader, operator = users["reader"], users["operator"]
    # Reader: records yes, changes no.
    for path in ("/vdis", "/srs", "/hosts", "/tasks"):
        assert (await client.get(path, headers=reader)).status == 200, path
    resp = await client.post("/vdis", json={"virtual_size": 1024}, headers=reader)
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "PERMISSION_DENIED" and "operator" in body["message"]
    assert (await client.post("/tasks", json={"name_label": "t"}, headers=reader)).status == 403
    # Operator: VDIs and tasks yes, users no.
    assert (await client.post("/vdis", json={"virtual_size": 1024}, headers=operator)).status == 201
    assert (await client.post("/tasks", json={"name_label": "t"}, headers=operator)).status == 201
    for method, path in (("GET", "/users"), ("POST", "/users"), ("DELETE", "/users/reed")):
        resp = await client.request(method, path, headers=operator, json={})
        assert resp.status == 403, (method, path)
        assert (await resp.json())["error"] == "PERMISSION_DENIED"
    # 401 beats 403: bad credentials on an admin route are 401, not 403.
    resp = await client.get("/users", headers=basic("oper", "wrong-password"))
    await assert_401(resp, "SESSION_AUTHENTICATION_FAILED")


async def test_sessions_carry_current_role(client, users):
    """Roles are read at each request, so a demotion takes effect on live sessions."""
    _, body = await login(client, headers=users["operator"])
    bearer = {"Authorization": f"Bearer {body['session_id']}"}
    assert (await client.post("/tasks", json={"name_label": "x"}, headers=bearer)).status == 201
    await client.patch("/users/oper", json={"role": "reader"}, headers=ADMIN)
    assert (await client.post("/tasks", json={"name_label": "x"}, headers=bearer)).status == 403


async def test_unknown_route_is_json_404_even_without_auth(client):
    resp = await client.get("/no/such/thing")
    assert resp.status == 404
    assert (await resp.json())["error"] == "NOT_FOUND"
