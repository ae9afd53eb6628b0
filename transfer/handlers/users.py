"""User administration (admin only): /users."""

from __future__ import annotations

from aiohttp import web

from auth.middleware import requires
from transfer.handlers.common import field, json_response, read_json
from transfer.services import services


@requires("admin")
async def list_users(request: web.Request) -> web.Response:
    """GET /users: every user's name and role."""
    return json_response(await services(request).users.list())


@requires("admin")
async def get_user(request: web.Request) -> web.Response:
    """GET /users/{username}: the user's name and role."""
    user = await services(request).users.require(request.match_info["username"])
    return json_response({"username": user["username"], "role": user["role"]})


@requires("admin")
async def add_user(request: web.Request) -> web.Response:
    """POST /users: JSON {username, password, role?} -> 201 with the user's name and role."""
    body = await read_json(request)
    username = field(body, "username", str, required=True)
    password = field(body, "password", str, required=True)
    role = field(body, "role", str, "reader")
    await services(request).users.add(username, password, role)
    return json_response({"username": username, "role": role}, status=201)


@requires("admin")
async def change_user(request: web.Request) -> web.Response:
    """Change a user's password and/or role: JSON {password?, role?}."""
    svc = services(request)
    name = request.match_info["username"]
    await svc.users.require(name)
    body = await read_json(request)
    password = field(body, "password", str, None)
    role = field(body, "role", str, None)
    if role is not None:
        await svc.users.set_role(name, role)
    if password is not None:
        await svc.users.set_password(name, password)
    user = await svc.users.require(name)
    return json_response({"username": user["username"], "role": user["role"]})


@requires("admin")
async def remove_user(request: web.Request) -> web.Response:
    """DELETE /users/{username}: remove the user (never the last admin); answers 204."""
    await services(request).users.remove(request.match_info["username"])
    return web.Response(status=204)
