"""The failures a client can see: a code from the external contract, a message, XAPI-style
params. Plain data: where they go out over HTTP, the edge (transfer/handlers/errors.py) maps
the code to a status; a failed task stores them as its error_info."""

from __future__ import annotations


class ApiError(Exception):
    """A failure with a contract error code; rendered as JSON {error, message, params}.

    `status` is for the few cases where the contract answers a code with another status than
    its usual one (a finished upload resource is 410 Gone); `headers` carries what the client
    needs to act on the error (Upload-Offset, Retry-After)."""

    def __init__(
        self,
        code: str,
        message: str,
        *params: object,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.params = [str(p) for p in params]
        self.status = status
        self.headers = headers or {}

    def to_json(self) -> dict:
        return {"error": self.code, "message": self.message, "params": self.params}

    @property
    def error_info(self) -> list[str]:
        """The XAPI-style [CODE, params...] list stored on a failed task."""
        return [self.code, *self.params] if self.params else [self.code, self.message]


class ClientGone(ApiError):
    """The client stopped sending before the end of its body: a resumable upload is
    suspended by it (it may go on), any other transfer fails."""


def bad_request(message: str, *params: object) -> ApiError:
    """The request itself is wrong (400): a parameter, a header, a body."""
    return ApiError("BAD_REQUEST", message, *params)
