"""Structured logging shared by every package: `event` writes one event with its fields,
and LOG_FIELDS holds what a request adds to its access-log line (user, task, vdi, bytes,
error): the authentication middleware names the user, handlers the objects they touched."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

LOG_FIELDS = web.RequestKey("log_fields", dict)


def event(logger: logging.Logger, _event: str, _level: int = logging.INFO, **fields: Any) -> None:
    """Log `_event` with `fields` as its structured fields (logfmt or JSON: transfer/logs.py)."""
    logger.log(_level, _event, extra={"fields": fields})
