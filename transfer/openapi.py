"""The OpenAPI 3.1 description of the HTTP API, served at GET /openapi.json.

Written out here, next to nothing it could drift from unnoticed: tests/test_openapi.py
checks that every route of transfer/handlers/routes.py is described, and runs schemathesis
against the live server with it (no 500 for any generated request, every answer as
described). Error answers are all the same JSON shape; each operation lists the codes it
gives, under the status the contract sets for them."""

from __future__ import annotations

from typing import Any

from auth.passwords import MAX_LENGTH, MIN_LENGTH
from auth.users import USERNAME as USERNAME_RE
from formats.registry import EXPORT_FORMATS, RUNTIME_FORMATS, UPLOAD_FORMATS
from transfer import __version__
from transfer.handlers.errors import STATUS_BY_CODE

JSON = "application/json"
UUID = {"type": "string", "format": "uuid"}
STAMP = {"type": "string", "format": "date-time"}
NULLABLE_UUID = {"type": ["string", "null"], "format": "uuid"}
USERNAME = {"type": "string", "pattern": f"^{USERNAME_RE.pattern}$"}
SIZE_PATTERN = "^[0-9]+[KMGTPkmgtp]?(i?[Bb])?$"  # what transfer/sizes.py reads
PASSWORD = {"type": "string", "minLength": MIN_LENGTH, "maxLength": MAX_LENGTH}

# The status each error code leaves with: the answers' own table, and the codes that set
# their status where they are raised.
STATUS = {
    **STATUS_BY_CODE,
    "VDI_NO_CBT_METADATA": 409,
    "VDI_INCOMPATIBLE_TYPE": 409,
    "HEADERS_TOO_LARGE": 431,
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Any) -> dict:
    return {"type": "object", "required": required, "properties": properties}


def _all(**properties: Any) -> dict:
    return _obj(list(properties), **properties)


SCHEMAS: dict[str, dict] = {
    "Error": {
        **_all(
            error={"type": "string", "description": "the error code, e.g. VDI_NOT_FOUND"},
            message={"type": "string", "description": "what went wrong, for a person"},
            params={"type": "array", "items": {"type": "string"}},
        ),
        "additionalProperties": False,
    },
    "Vdi": _all(
        uuid=UUID,
        ref={"type": "string"},
        name_label={"type": "string"},
        sr=UUID,
        virtual_size={"type": "integer", "minimum": 0},
        physical_utilisation={"type": "integer", "minimum": 0},
        image_format={"enum": list(RUNTIME_FORMATS)},
        read_only={"type": "boolean"},
        is_a_snapshot={"type": "boolean"},
        snapshot_of=NULLABLE_UUID,
        parent=NULLABLE_UUID,
        backing_chain={
            "type": "array",
            "items": _all(uuid=UUID, image_format={"enum": list(RUNTIME_FORMATS)}),
        },
        cbt_enabled={"type": "boolean"},
        type={"enum": ["user", "cbt_metadata"]},
        created=STAMP,
    ),
    "Sr": _all(
        uuid=UUID,
        ref={"type": "string"},
        name_label={"type": "string"},
        type={"type": "string"},
        shared={"type": "boolean"},
        host=NULLABLE_UUID,
        supported_image_formats={"type": "array", "items": {"type": "string"}},
        default_image_format={"type": "string"},
        physical_size={"type": ["integer", "null"]},
        physical_utilisation={"type": ["integer", "null"]},
    ),
    "Host": _all(
        uuid=UUID,
        name_label={"type": "string"},
        address={"type": "string"},
        live={"type": "boolean"},
        this_host={"type": "boolean"},
        last_heartbeat=STAMP,
    ),
    "Task": _all(
        uuid=UUID,
        ref={"type": "string"},
        name_label={"type": "string"},
        status={"enum": ["pending", "cancelling", "success", "failure", "cancelled"]},
        progress={"type": "number", "minimum": 0, "maximum": 1},
        created=STAMP,
        finished={"type": ["string", "null"], "format": "date-time"},
        result={"type": ["string", "null"]},
        error_info={"type": "array", "items": {"type": "string"}},
        bytes_transferred={"type": "integer", "minimum": 0},
        upload_offset={"type": ["integer", "null"]},
        upload_active={"type": ["boolean", "null"]},
        upload_parts={"type": ["integer", "null"], "minimum": 1},
        upload_parts_done={"type": ["array", "null"], "items": {"type": "integer"}},
        vdi=NULLABLE_UUID,
        owner={"type": ["string", "null"]},
    ),
    "User": _all(username=USERNAME, role={"enum": ["admin", "operator", "reader"]}),
    "Session": _all(
        session_id={"type": "string"},
        expires_at=STAMP,
        username={"type": "string"},
        role={"enum": ["admin", "operator", "reader"]},
    ),
    "Whoami": _all(
        username={"type": "string"},
        role={"enum": ["admin", "operator", "reader"]},
        via={"type": "string"},
    ),
    "Extent": _obj(
        ["start", "length", "zero"],
        start={"type": "integer", "minimum": 0},
        length={"type": "integer", "minimum": 0},
        zero={"type": "boolean"},
        hole={"type": "boolean"},
    ),
    "Checksum": _all(
        algorithm={"enum": ["sha256", "blake2b"]},
        block_size={"type": "integer"},
        checksum={"type": "string"},
    ),
    "ChangedBlocks": _all(
        block_size={"const": 65536},
        bitmap={"type": "string", "contentEncoding": "base64"},
    ),
    "ImportResult": _all(
        task={"type": ["string", "null"]},
        vdi=UUID,
        bytes={"type": "integer", "minimum": 0},
    ),
    "ImportOptions": _all(
        formats={"type": "array", "items": {"enum": list(UPLOAD_FORMATS)}},
        max_writers={"type": "integer", "minimum": 1},
        features={"type": "array", "items": {"type": "string"}},
    ),
    "ExportOptions": _all(
        formats={"type": "array", "items": {"enum": list(EXPORT_FORMATS)}},
        max_readers={"type": "integer", "minimum": 1},
        features={"type": "array", "items": {"type": "string"}},
    ),
    "Status": _obj(
        ["status", "host"],
        status={"type": "string"},
        host=UUID,
        reasons={"type": "array", "items": {"type": "string"}},
    ),
}


def _query(name: str, description: str, schema: dict | None = None, required: bool = False):
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str, description: str = "a uuid or an OpaqueRef") -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _json_body(schema: dict, required: bool = True) -> dict:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _op(
    summary: str,
    ok: dict[str, dict],
    errors: list[str],
    *,
    role: str | None = "reader",
    parameters: list[dict] | None = None,
    body: dict | None = None,
    redirects: bool = False,
) -> dict:
    """One operation: its answers, and the error codes it gives grouped by status."""
    codes = list(errors)
    if role is not None:
        codes += ["SESSION_INVALID", "SESSION_AUTHENTICATION_FAILED", "PERMISSION_DENIED"]
    responses: dict[str, dict] = dict(ok)
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(STATUS[code], []).append(code)
    for status, grouped in sorted(by_status.items()):
        responses[str(status)] = {
            "description": ", ".join(sorted(set(grouped))),
            "content": {JSON: {"schema": _ref("Error")}},
        }
    if redirects:
        responses["302"] = {
            "description": "served by another host of the pool: Location says where",
            "headers": {"Location": {"schema": {"type": "string"}}},
        }
    # Whatever else fails (the server's own limits, a bug) fails in the same shape.
    responses["default"] = {"description": "an error", "content": {JSON: {"schema": _ref("Error")}}}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if role is None:
        operation["security"] = []
    else:
        operation["description"] = f"Needs the {role} role (or a higher one)."
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _list(name: str) -> dict:
    return {"type": "array", "items": _ref(name)}


VDI_PATH = [_path("uuid")]


def _derive(summary: str, made: str) -> dict:
    """A snapshot or a clone: the same request, the same errors."""
    return _op(
        summary,
        {"201": _json(made, _ref("Vdi"))},
        [
            "VDI_NOT_FOUND",
            "VDI_IN_USE",
            "VDI_INCOMPATIBLE_TYPE",
            "SR_FULL",
            "BAD_REQUEST",
            "UNSUPPORTED_MEDIA_TYPE",
            "HOST_OFFLINE",
        ],
        role="operator",
        parameters=VDI_PATH,
        body=NAME_BODY,
        redirects=True,
    )


NAME_BODY = _json_body(
    {"type": "object", "properties": {"name_label": {"type": "string", "maxLength": 255}}},
    required=False,
)
BINARY = {"type": "string", "format": "binary"}
TRANSFER_ERRORS = ["BAD_REQUEST", "TOO_MANY_TRANSFERS", "HOST_OFFLINE", "TASK_NOT_FOUND"]

IMPORT_PARAMETERS = [
    _query("vdi", "the VDI to write (or sr= for a new one)"),
    _query("sr", "the SR of a new VDI, sized by the upload"),
    _query("format", "the upload's format", {"enum": list(UPLOAD_FORMATS)}),
    _query("chunked", "XAPI chunk framing of raw data", {"enum": ["true", "false"]}),
    _query("task_id", "a task to report into; makes the upload resumable"),
    _query("virtual_size", "the size of a new VDI (raw uploads of unknown length)"),
    _query("name_label", "the name of a new VDI"),
    _query(
        "parts",
        "an upload in parts over several connections: how many (with task_id=, vdi=, chunked)",
        {"type": "integer", "minimum": 1, "maximum": 16},
    ),
    _query("part", "which part this request sends, from 0", {"type": "integer", "minimum": 0}),
]
IMPORT = _op(
    "Import a disk into a VDI (XAPI's import_raw_vdi)",
    {
        "200": _json("the upload is complete (or, with parts=, this part)", _ref("ImportResult")),
        "204": {"description": "a part of a resumable upload arrived (Upload-Offset)"},
    },
    [
        *TRANSFER_ERRORS,
        "VDI_NOT_FOUND",
        "SR_NOT_FOUND",
        "VDI_IN_USE",
        "VDI_READ_ONLY",
        "UPLOAD_OFFSET_MISMATCH",
        "VDI_TOO_SMALL",
        "FORMAT_UNSUPPORTED",
        "IMAGE_INVALID",
        "SR_FULL",
        "OTHER_OPERATION_IN_PROGRESS",
    ],
    role="operator",
    parameters=IMPORT_PARAMETERS,
    body={"required": False, "content": {"application/octet-stream": {"schema": BINARY}}},
    redirects=True,
)
EXPORT = _op(
    "Export a VDI, whole or since base= (XAPI's export_raw_vdi), with Range",
    {
        "200": {
            "description": "the disk in the asked format",
            "content": {"application/octet-stream": {"schema": BINARY}},
        },
        "206": {"description": "the asked range of it"},
    },
    [
        *TRANSFER_ERRORS,
        "VDI_NOT_FOUND",
        "VDI_IN_USE",
        "VDI_INCOMPATIBLE_TYPE",
        "VDI_NO_CBT_METADATA",
        "FORMAT_UNSUPPORTED",
        "RANGE_NOT_SATISFIABLE",
    ],
    parameters=[
        _query("vdi", "the VDI", required=True),
        _query("format", "the format to send", {"enum": list(EXPORT_FORMATS)}),
        _query("chunked", "XAPI chunk framing of raw data", {"enum": ["true", "false"]}),
        _query("base", "an older version: send only what changed since"),
        _query("task_id", "a task to run the export under"),
    ],
    redirects=True,
)
UPLOAD_STATUS = _op(
    "How far a resumable upload is (Upload-Offset)",
    {"200": {"description": "Upload-Offset and Upload-Complete headers"}},
    ["TASK_NOT_FOUND", "BAD_REQUEST", "UPLOAD_EXPIRED"],
    role="operator",
    parameters=[_query("task_id", "the upload's task", required=True)],
)

PATHS: dict[str, dict[str, dict]] = {
    "/health": {"get": _op("Liveness", {"200": _json("alive", _ref("Status"))}, [], role=None)},
    "/ready": {
        "get": _op(
            "Readiness: database reachable, SRs mounted, not stopping",
            {"200": _json("ready", _ref("Status")), "503": _json("not ready", _ref("Status"))},
            [],
            role=None,
        )
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics",
            {"200": {"description": "the text format", "content": {"text/plain": {}}}},
            [],
            role=None,
        )
    },
    "/openapi.json": {
        "get": _op(
            "This description",
            {"200": _json("OpenAPI 3.1", {"type": "object"})},
            [],
            role=None,
        )
    },
    "/session": {
        "post": _op(
            "Log in: basic auth or {username, password} -> a session id (and cookie)",
            {"200": _json("a session", _ref("Session"))},
            ["BAD_REQUEST", "UNSUPPORTED_MEDIA_TYPE", "TOO_MANY_ATTEMPTS"],
            role=None,
            body=_json_body(
                _obj(
                    ["username", "password"],
                    username={"type": "string"},
                    password={"type": "string"},
                ),
                required=False,
            ),
        ),
        "get": _op("Who is calling", {"200": _json("the caller", _ref("Whoami"))}, []),
        "delete": _op("Log out: revoke the session", {"204": {"description": "revoked"}}, []),
    },
    "/users": {
        "get": _op("Users", {"200": _json("all", _list("User"))}, [], role="admin"),
        "post": _op(
            "Add a user",
            {"201": _json("added", _ref("User"))},
            ["BAD_REQUEST", "USER_EXISTS", "UNSUPPORTED_MEDIA_TYPE"],
            role="admin",
            body=_json_body(
                _obj(
                    ["username", "password"],
                    username=USERNAME,
                    password=PASSWORD,
                    role={"enum": ["admin", "operator", "reader"]},
                )
            ),
        ),
    },
    "/users/{username}": {
        "get": _op(
            "A user",
            {"200": _json("the user", _ref("User"))},
            ["USER_NOT_FOUND"],
            role="admin",
            parameters=[_path("username", "the user's name")],
        ),
        "patch": _op(
            "Change a user's password or role",
            {"200": _json("the user", _ref("User"))},
            ["USER_NOT_FOUND", "BAD_REQUEST", "UNSUPPORTED_MEDIA_TYPE"],
            role="admin",
            parameters=[_path("username", "the user's name")],
            body=_json_body(
                {
                    "type": "object",
                    "properties": {
                        "password": PASSWORD,
                        "role": {"enum": ["admin", "operator", "reader"]},
                    },
                }
            ),
        ),
        "delete": _op(
            "Remove a user (never the last admin)",
            {"204": {"description": "removed"}},
            ["USER_NOT_FOUND", "BAD_REQUEST"],
            role="admin",
            parameters=[_path("username", "the user's name")],
        ),
    },
    "/hosts": {"get": _op("Hosts of the pool", {"200": _json("all", _list("Host"))}, [])},
    "/hosts/{uuid}": {
        "get": _op(
            "A host",
            {"200": _json("the host", _ref("Host"))},
            ["HOST_NOT_FOUND"],
            parameters=[_path("uuid")],
        )
    },
    "/srs": {"get": _op("Storage repositories", {"200": _json("all", _list("Sr"))}, [])},
    "/srs/{uuid}": {
        "get": _op(
            "An SR",
            {"200": _json("the SR", _ref("Sr"))},
            ["SR_NOT_FOUND"],
            parameters=[_path("uuid")],
        )
    },
    "/vdis": {
        "get": _op(
            "VDIs",
            {"200": _json("all, or an SR's", _list("Vdi"))},
            ["SR_NOT_FOUND"],
            parameters=[_query("sr", "only this SR's")],
        ),
        "post": _op(
            "Create an empty VDI",
            {"201": _json("created", _ref("Vdi"))},
            [
                "BAD_REQUEST",
                "SR_NOT_FOUND",
                "FORMAT_UNSUPPORTED",
                "UNSUPPORTED_MEDIA_TYPE",
                "SR_FULL",
                "HOST_OFFLINE",
            ],
            role="operator",
            body=_json_body(
                _obj(
                    ["virtual_size"],
                    virtual_size={
                        "oneOf": [
                            {"type": "integer", "minimum": 1},
                            {"type": "string", "pattern": SIZE_PATTERN, "description": "10G"},
                        ]
                    },
                    sr={"type": "string"},
                    name_label={"type": "string", "maxLength": 255},
                    image_format={"enum": list(RUNTIME_FORMATS)},
                )
            ),
            redirects=True,
        ),
    },
    "/vdis/{uuid}": {
        "get": _op(
            "A VDI",
            {"200": _json("the VDI", _ref("Vdi"))},
            ["VDI_NOT_FOUND"],
            parameters=VDI_PATH,
        ),
        "patch": _op(
            "Turn changed block tracking on or off",
            {"200": _json("the VDI", _ref("Vdi"))},
            [
                "VDI_NOT_FOUND",
                "BAD_REQUEST",
                "VDI_IN_USE",
                "VDI_READ_ONLY",
                "UNSUPPORTED_MEDIA_TYPE",
                "HOST_OFFLINE",
            ],
            role="operator",
            parameters=VDI_PATH,
            body=_json_body(_obj(["cbt_enabled"], cbt_enabled={"type": "boolean"})),
            redirects=True,
        ),
        "delete": _op(
            "Delete a VDI (a snapshot others read through is hidden until merged)",
            {"204": {"description": "deleted"}},
            ["VDI_NOT_FOUND", "VDI_IN_USE", "HOST_OFFLINE"],
            role="operator",
            parameters=VDI_PATH,
            redirects=True,
        ),
    },
    "/vdis/{uuid}/changed_blocks": {
        "get": _op(
            "Blocks written since base= (XAPI's VDI.list_changed_blocks)",
            {"200": _json("the bitmap", _ref("ChangedBlocks"))},
            ["VDI_NOT_FOUND", "BAD_REQUEST", "VDI_NO_CBT_METADATA"],
            parameters=[*VDI_PATH, _query("base", "the older version", required=True)],
        )
    },
    "/vdis/{uuid}/snapshot": {"post": _derive("Snapshot a VDI", "the snapshot")},
    "/vdis/{uuid}/clone": {"post": _derive("Clone a VDI (writable)", "the clone")},
    "/vdis/{uuid}/data_destroy": {
        "post": _op(
            "Release a tracked snapshot's data, keep its record (cbt_metadata)",
            {"200": _json("the record", _ref("Vdi"))},
            [
                "VDI_NOT_FOUND",
                "VDI_IN_USE",
                "VDI_NO_CBT_METADATA",
                "VDI_INCOMPATIBLE_TYPE",
                "HOST_OFFLINE",
            ],
            role="operator",
            parameters=VDI_PATH,
            redirects=True,
        )
    },
    "/vdis/{uuid}/extents": {
        "get": _op(
            "Data and zero extents, or what changed since base=",
            {"200": _json("the extents", _list("Extent"))},
            [
                "VDI_NOT_FOUND",
                "VDI_IN_USE",
                "VDI_INCOMPATIBLE_TYPE",
                "VDI_NO_CBT_METADATA",
                "BAD_REQUEST",
                "HOST_OFFLINE",
            ],
            parameters=[*VDI_PATH, _query("base", "an older version of the disk")],
            redirects=True,
        )
    },
    "/vdis/{uuid}/checksum": {
        "get": _op(
            "A checksum of the disk's content (blkhash construction)",
            {"200": _json("the checksum", _ref("Checksum"))},
            [
                "VDI_NOT_FOUND",
                "VDI_IN_USE",
                "VDI_INCOMPATIBLE_TYPE",
                "BAD_REQUEST",
                "HOST_OFFLINE",
            ],
            parameters=[
                *VDI_PATH,
                _query("algorithm", "the hash", {"enum": ["sha256", "blake2b"]}),
                _query("block_size", "bytes per block, a power of two (4MiB)"),
            ],
            redirects=True,
        )
    },
    "/tasks": {
        "get": _op("Tasks", {"200": _json("all", _list("Task"))}, []),
        "post": _op(
            "Create a task to name as task_id=",
            {"201": _json("the task", _ref("Task"))},
            ["BAD_REQUEST", "UNSUPPORTED_MEDIA_TYPE"],
            role="operator",
            body=_json_body(
                _obj(
                    ["name_label"], name_label={"type": "string", "minLength": 1, "maxLength": 255}
                )
            ),
        ),
    },
    "/tasks/{uuid}": {
        "get": _op(
            "A task",
            {"200": _json("the task", _ref("Task"))},
            ["TASK_NOT_FOUND"],
            parameters=[_path("uuid")],
        ),
        "delete": _op(
            "Forget a task with no transfer running",
            {"204": {"description": "forgotten"}},
            ["TASK_NOT_FOUND", "OTHER_OPERATION_IN_PROGRESS"],
            role="operator",
            parameters=[_path("uuid")],
        ),
    },
    "/tasks/{uuid}/cancel": {
        "post": _op(
            "Cancel a task and stop its transfer",
            {"200": _json("the task", _ref("Task"))},
            ["TASK_NOT_FOUND"],
            role="operator",
            parameters=[_path("uuid")],
        )
    },
    "/import_raw_vdi": {
        "put": IMPORT,
        "head": UPLOAD_STATUS,
        "options": _op(
            "What uploads may use: formats, writers at once, features",
            {"200": _json("the capabilities", _ref("ImportOptions"))},
            [],
        ),
    },
    "/import_raw_vdi/{tail}": {
        "put": {**IMPORT, "parameters": [*IMPORT_PARAMETERS, _path("tail", "a file name")]},
        "head": {
            **UPLOAD_STATUS,
            "parameters": [*UPLOAD_STATUS["parameters"], _path("tail", "a file name")],
        },
    },
    "/export_raw_vdi": {
        "get": EXPORT,
        "options": _op(
            "What downloads may use: formats, readers at once, features",
            {"200": _json("the capabilities", _ref("ExportOptions"))},
            [],
        ),
    },
    "/export_raw_vdi/{tail}": {
        "get": {**EXPORT, "parameters": [*EXPORT["parameters"], _path("tail", "a file name")]}
    },
    "/uploads/{task}": {
        "head": _op(
            "The resumable upload's offset (IETF resumable uploads)",
            {"204": {"description": "Upload-Offset, Upload-Complete"}},
            ["TASK_NOT_FOUND", "UPLOAD_EXPIRED"],
            role="operator",
            parameters=[_path("task")],
        ),
        "patch": _op(
            "Append to a resumable upload at Upload-Offset",
            {
                "200": _json("complete", _ref("ImportResult")),
                "204": {"description": "appended"},
            },
            [
                *TRANSFER_ERRORS,
                "UPLOAD_OFFSET_MISMATCH",
                "UPLOAD_EXPIRED",
                "VDI_IN_USE",
                "VDI_TOO_SMALL",
                "IMAGE_INVALID",
                "UNSUPPORTED_MEDIA_TYPE",
                "SR_FULL",
            ],
            role="operator",
            parameters=[_path("task")],
            body={"content": {"application/partial-upload": {"schema": BINARY}}},
        ),
        "delete": _op(
            "Cancel a resumable upload",
            {"204": {"description": "cancelled"}},
            ["TASK_NOT_FOUND", "UPLOAD_EXPIRED"],
            role="operator",
            parameters=[_path("task")],
        ),
    },
    "/jsonrpc": {
        "post": _op(
            "XenAPI over JSON-RPC (1.0 and 2.0)",
            {"200": _json("a JSON-RPC answer", {"type": ["object", "array"]})},
            ["BAD_REQUEST", "UNSUPPORTED_MEDIA_TYPE"],
            role=None,
            body=_json_body({"type": ["object", "array"]}),
        )
    },
}
for _xmlrpc in ("/", "/RPC2", "/xmlrpc"):
    PATHS[_xmlrpc] = {
        "post": _op(
            "XenAPI over XML-RPC",
            {"200": {"description": "a methodResponse", "content": {"text/xml": {}}}},
            ["BAD_REQUEST", "UNSUPPORTED_MEDIA_TYPE"],
            role=None,
            body={"required": True, "content": {"text/xml": {"schema": {"type": "string"}}}},
        )
    }


def document() -> dict:
    """The whole description, built once per call (it is small)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vdi-transfer",
            "version": __version__,
            "description": "Virtual disks in and out of storage over HTTP, XAPI-compatible. "
            "Every error is JSON {error, message, params}; see the README.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [
            {"basic": []},
            {"bearer": []},
            {"cookie": []},
            {"session_id": []},
            {"ticket": []},
        ],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "session_id"},
                "session_id": {"type": "apiKey", "in": "query", "name": "session_id"},
                "ticket": {"type": "apiKey", "in": "query", "name": "ticket"},
            },
        },
        "paths": PATHS,
    }
