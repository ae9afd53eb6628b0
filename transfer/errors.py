"""Choosing a format from a request parameter."""

from __future__ import annotations

from common.errors import ApiError


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
