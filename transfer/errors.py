"""The error codes of the external contract, and the exception that carries one to the client.

Every failure a client can see is an ApiError: a code from the contract, the HTTP status it
maps to, a human message, and XAPI-style params.
"""

from __future__ import annotations

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
    "IMAGE_INVALID": 400,
    "BAD_REQUEST": 400,
    "RANGE_NOT_SATISFIABLE": 416,
    "HOST_OFFLINE": 503,
    "SERVICE_UNAVAILABLE": 503,
    "INTERNAL_ERROR": 500,
}


class ApiError(Exception):
    """A failure with a contract error code; rendered as JSON {error, message, params}."""

    def __init__(
        self,
        code: str,
        message: str,
        *params: object,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers or {}  # extra response headers (e.g. Upload-Offset)
        self.code = code
        self.message = message
        self.params = [str(p) for p in params]
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)

    def to_json(self) -> dict:
        return {"error": self.code, "message": self.message, "params": self.params}

    @property
    def error_info(self) -> list[str]:
        """The XAPI-style [CODE, params...] list stored on a failed task."""
        return [self.code, *self.params] if self.params else [self.code, self.message]


def bad_request(message: str, *params: object) -> ApiError:
    return ApiError("BAD_REQUEST", message, *params)


def choose_format(
    value: str | None, known: tuple[str, ...], implemented: tuple[str, ...], doing: str
) -> str:
    """The `format=` parameter, case-insensitive, raw by default; FORMAT_UNSUPPORTED (415)
    for a name we do not know and for one we know but cannot do yet."""
    fmt = (value or "raw").lower()
    if fmt not in known:
        raise ApiError(
            "FORMAT_UNSUPPORTED",
            f"unknown {doing} format {value!r}; use one of {', '.join(known)}",
            value,
        )
    if fmt not in implemented:
        raise ApiError("FORMAT_UNSUPPORTED", f"{doing} as {fmt} is not implemented yet", fmt)
    return fmt
