"""Errors a codec raises on bad input; the service maps them to contract error codes."""

from __future__ import annotations


class FormatError(Exception):
    """The stream is malformed (IMAGE_INVALID, or BAD_REQUEST for transport framing)."""


class Unsupported(FormatError):
    """A valid stream of a kind this service does not import (FORMAT_UNSUPPORTED, not
    IMAGE_INVALID): say what it is and what is supported."""


class FramingError(FormatError):
    """The transport framing (XAPI chunk framing) is malformed (BAD_REQUEST)."""


class OutOfBounds(Exception):
    """The stream addresses bytes beyond the disk's virtual size (VDI_TOO_SMALL)."""

    def __init__(self, message: str, end: int, size: int):
        super().__init__(message)
        self.end = end
        self.size = size
