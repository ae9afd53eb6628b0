"""Errors as they leave over HTTP: the contract's status for each error code, and the
middleware that renders every failure as JSON {error, message, params}."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from auth.middleware import REALM
from common.errors import ApiError
from common.logfields import LOG_FIELDS
from transfer.handlers.common import json_response
from transfer.pool import Redirect, redirect_response

log = logging.getLogger("vdi_transfer")

STATUS_BY_CODE: dict[str, int] = {
    "SESSION_AUTHENTICATION_FAILED": 401,
    "SESSION_INVALID": 401,
    "PERMISSION_DENIED": 403,
    "VDI_NOT_FOUND": 404,
    "TASK_NOT_FOUND": 404,
    "SR_NOT_FOUND": 404,
    "HOST_NOT_FOUND": 404,
    "USER_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "VDI_IN_USE": 409,
    "VDI_READ_ONLY": 409,
    "UPLOAD_OFFSET_MISMATCH": 409,
    "UPLOAD_EXPIRED": 410,
    "OTHER_OPERATION_IN_PROGRESS": 409,
    "USER_EXISTS": 409,
    "VDI_TOO_SMALL": 413,
    "FORMAT_UNSUPPORTED": 415,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "IMAGE_INVALID": 400,
    "BAD_REQUEST": 400,
    "RANGE_NOT_SATISFIABLE": 416,
    "TOO_MANY_ATTEMPTS": 429,
    "HOST_OFFLINE": 503,
    "TOO_MANY_TRANSFERS": 503,
    "HEADERS_TOO_LARGE": 431,
    "SERVICE_UNAVAILABLE": 503,
    "INTERNAL_ERROR": 500,
    "SR_FULL": 507,
    "NOT_IMPLEMENTED": 501,
}
# aiohttp's own refusals (no such route, wrong method, body too large) in the same shape.
HTTP_ERROR_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "BAD_REQUEST"}


def status_of(exc: ApiError) -> int:
    """The status an error leaves with: its own if it sets one, else its code's, else 500."""
    return exc.status if exc.status is not None else STATUS_BY_CODE.get(exc.code, 500)


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON answer to a failure, with the headers the error carries (and `headers`)."""
    status = status_of(exc)
    extra = {**(headers or {}), **exc.headers}
    if status == 401:
        extra["WWW-Authenticate"] = REALM
    return json_response(exc.to_json(), status=status, headers=extra)


@web.middleware
async def errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as JSON {error, message, params} with the contract's status."""
    request[LOG_FIELDS] = {}
    try:
        return await handler(request)
    except Redirect as redirect:
        return redirect_response(request, redirect)
    except ApiError as exc:
        request[LOG_FIELDS]["error"] = exc.code
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(exc.status, "BAD_REQUEST")
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        body = {"error": code, "message": exc.reason, "params": [request.path]}
        return json_response(body, status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"fields": {"path": request.path}})
        body = {"error": "INTERNAL_ERROR", "message": "internal server error", "params": []}
        return json_response(body, status=500)
