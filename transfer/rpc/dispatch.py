"""Calling a XenAPI method: find it, check the parameter count, the session and the role,
run it, and turn every failure into XAPI's error description [CODE, params...].

Methods register with `@xapi(name, role)`; their Python parameters after the context are
the XenAPI parameters after the session, so the count XAPI checks is the signature's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from auth.middleware import Principal
from auth.roles import allows
from common.errors import ApiError
from common.logfields import event
from transfer.rpc.wire import Call
from transfer.services import Services

log = logging.getLogger("vdi_transfer.rpc")


class XapiError(Exception):
    """A XenAPI failure: its ErrorDescription, [CODE, params...], all strings."""

    def __init__(self, code: str, *params: object):
        super().__init__(code)
        self.description = [code, *(str(p) for p in params)]


@dataclass
class Context:
    """Who calls, from where, on which host: what a method runs with."""

    svc: Services
    remote: str | None
    session: str | None = None
    principal: Principal | None = None

    @property
    def username(self) -> str:
        assert self.principal is not None
        return self.principal.username


Method = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Spec:
    """A registered method: what it runs, who may call it, how many params it takes."""

    run: Method
    role: str | None  # None: any valid session (or none at all, without `session`)
    session: bool  # the first XenAPI parameter is a session reference
    least: int  # XenAPI parameters, the session included
    most: int


METHODS: dict[str, Spec] = {}
_FOLDED: dict[str, str] = {}  # XAPI matches class names case-insensitively: vdi.get_record


def xapi(name: str, role: str | None = "reader", *, session: bool = True):
    """Register a coroutine `(ctx, *params)` as the XenAPI method `name`."""

    def register(run: Method) -> Method:
        params = list(inspect.signature(run).parameters.values())[1:]
        required = sum(1 for p in params if p.default is inspect.Parameter.empty)
        add = int(session)
        spec = Spec(run, role, session, required + add, len(params) + add)
        METHODS[name] = spec
        _FOLDED[name.lower()] = name
        return run

    return register


def method_names() -> list[str]:
    """The names of all registered methods, sorted."""
    return sorted(METHODS)


ASYNC = "Async."
_running: set[asyncio.Task] = set()  # Async calls under way (kept from the GC)


def _lookup(name: str) -> Spec | None:
    return METHODS.get(name) or METHODS.get(_FOLDED.get(name.lower(), ""))


async def dispatch(ctx: Context, call: Call) -> Any:
    """The method's result, or XapiError. `Async.<method>` answers a task at once and runs
    the method under it, as XAPI does."""
    name = call.method
    asynchronous = name.startswith(ASYNC)
    spec = _lookup(name[len(ASYNC) :] if asynchronous else name)
    if spec is None or (asynchronous and not spec.session):
        raise XapiError("MESSAGE_METHOD_UNKNOWN", name)
    params = call.params
    if not spec.least <= len(params) <= spec.most:
        raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", name, spec.most, len(params))
    try:
        if spec.session:
            ctx.session = params[0]
            ctx.principal = await _authenticate(ctx, params[0])
            if spec.role is not None and not allows(ctx.principal.role, spec.role):
                raise XapiError(
                    "RBAC_PERMISSION_DENIED",
                    name,
                    f"this needs the {spec.role} role; user {ctx.principal.username!r} "
                    f"is {ctx.principal.role}",
                )
            params = params[1:]
        if asynchronous:
            return await _start(ctx, name, spec, params)
        return await spec.run(ctx, *params)
    except ApiError as exc:
        raise XapiError(*describe(exc)) from None


async def _start(ctx: Context, name: str, spec: Spec, params: list[Any]) -> str:
    """The task of an Async call; the call runs in the background and ends the task with
    its result (a VDI it made is the task's result) or its error."""
    tasks = ctx.svc.tasks
    row = await tasks.create(name, ctx.username, running=True)

    async def run() -> None:
        error, result = None, None
        try:
            value = await spec.run(ctx, *params)
            if isinstance(value, str) and value.startswith("OpaqueRef:"):
                made = await ctx.svc.db.fetchone("SELECT uuid FROM vdis WHERE ref = ?", value)
                result = made["uuid"] if made else None
        except XapiError as exc:
            error = exc.description
        except ApiError as exc:
            error = describe(exc)
        except Exception as exc:
            log.exception("Async call failed", extra={"fields": {"method": name}})
            error = ["INTERNAL_ERROR", str(exc) or repr(exc)]
        await tasks.settle(row["uuid"], error, result)

    job = asyncio.create_task(run())
    _running.add(job)
    job.add_done_callback(_running.discard)
    return row["ref"]


async def _authenticate(ctx: Context, session: Any) -> Principal:
    if not isinstance(session, str) or not session:
        raise XapiError("SESSION_INVALID", session if isinstance(session, str) else "")
    try:
        return await ctx.svc.auth.check_session(session)
    except ApiError:
        raise XapiError("SESSION_INVALID", session) from None


def describe(exc: ApiError) -> list[str]:
    """An error of the HTTP API in XAPI's words."""
    if exc.code == "PERMISSION_DENIED":
        return ["RBAC_PERMISSION_DENIED", *exc.params, exc.message]
    if exc.code == "SESSION_AUTHENTICATION_FAILED":
        return [exc.code, *exc.params, "Authentication failure"]
    if exc.code in ("INTERNAL_ERROR",):
        event(log, "rpc.failed", logging.WARNING, error=exc.code, message=exc.message)
    return [exc.code, *exc.params, exc.message]


def text(value: Any, field: str) -> str:
    """A string parameter; FIELD_TYPE_ERROR naming it otherwise."""
    if not isinstance(value, str):
        raise XapiError("FIELD_TYPE_ERROR", field)
    return value


def integer(value: Any, field: str) -> int:
    """An int64 parameter: a number, or (XML-RPC, as XAPI sends them) a decimal string."""
    if isinstance(value, bool):
        raise XapiError("FIELD_TYPE_ERROR", field)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise XapiError("FIELD_TYPE_ERROR", field)
