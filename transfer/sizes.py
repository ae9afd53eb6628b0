"""Sizes as users write them: 1073741824, "1073741824", "10G", "512MiB", "2 TiB"."""

from __future__ import annotations

import re

from common.errors import bad_request

SECTOR = 512
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE | re.ASCII)


def parse_size(value: object, name: str = "size") -> int:
    """Bytes from an int or a string with an optional binary unit (K, M, G, T, P; B/iB ok)."""
    if isinstance(value, bool):
        raise bad_request(f"{name} must be a number of bytes", value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * UNITS[m.group(2).upper()]
    else:
        raise bad_request(f"{name} must be a number of bytes, optionally with K/M/G/T", value)
    if size < 0:
        raise bad_request(f"{name} must not be negative", value)
    return size


def round_to_sector(size: int) -> int:
    """Virtual sizes are whole 512-byte sectors; a size given otherwise is rounded up."""
    return -(-size // SECTOR) * SECTOR
