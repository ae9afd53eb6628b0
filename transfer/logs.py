"""Structured logging: one line per event, as logfmt (default, readable) or JSON lines.

Callers log an event name plus fields: ``event(log, "task.transition", task=..., status=...)``.
Credentials are never passed as fields; `redact_query` strips them from logged URLs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

SECRET_PARAMS = frozenset({"session_id", "ticket", "password", "token"})


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items() if v is not None)


def _logfmt(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.3f}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\\'):
        return json.dumps(text)
    return text


def setup(fmt: str = "logfmt", level: str = "info") -> None:
    """Route all logging (ours and aiohttp's) through one structured handler on stderr."""
    if fmt not in ("logfmt", "json"):
        raise ValueError(f"log format must be logfmt or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def redact_query(query: dict) -> dict:
    """A loggable copy of query parameters with credentials masked."""
    return {k: ("***" if k in SECRET_PARAMS else v) for k, v in query.items()}
