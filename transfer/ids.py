"""Identifiers and timestamps as clients see them: uuids, XAPI OpaqueRefs, ISO 8601 UTC."""

from __future__ import annotations

import time
import uuid


def new_uuid() -> str:
    """A random (version 4) uuid as a string: the id of a new record."""
    return str(uuid.uuid4())


def new_ref() -> str:
    """A XAPI-style reference; deliberately not derived from the uuid, as in XAPI."""
    return f"OpaqueRef:{uuid.uuid4()}"


def iso(ts: float | None) -> str | None:
    """A UNIX timestamp as ISO 8601 UTC with second precision (XAPI's datetime form)."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
