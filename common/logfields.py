"""The fields a request adds to its access-log line (user, task, vdi, bytes, error): the
authentication middleware names the user, handlers the objects they touched."""

from __future__ import annotations

from aiohttp import web

LOG_FIELDS = web.RequestKey("log_fields", dict)
