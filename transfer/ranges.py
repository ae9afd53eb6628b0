"""HTTP Range and If-Range (RFC 9110 section 14) for one byte range of a known length."""

from __future__ import annotations

import re

from common.errors import ApiError

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def requested_range(
    range_header: str | None, if_range: str | None, etag: str, length: int
) -> tuple[int, int] | None:
    """The [start, end) the client asked for, or None for the whole representation.

    A malformed Range, or several ranges, is ignored (RFC 9110 lets a server send the whole
    representation). An If-Range that is not our current strong ETag (a date, an old ETag)
    also means the whole representation, so a resumed download never splices two versions.
    A range starting at or beyond the end is RANGE_NOT_SATISFIABLE (416).
    """
    if not range_header:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None
    m = _RANGE.match(range_header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last) + 1, length) if last else length
        if last and int(last) < start:
            return None  # invalid: ignore
        if start >= length:
            raise not_satisfiable(length)
        return start, end
    suffix = int(last)
    if suffix == 0:
        raise not_satisfiable(length)
    return max(0, length - suffix), length


def not_satisfiable(length: int) -> ApiError:
    """RANGE_NOT_SATISFIABLE (416) for a range outside an export of `length` bytes."""
    return ApiError(
        "RANGE_NOT_SATISFIABLE",
        f"the range is outside the {length} bytes of this export",
        length,
    )
