"""XenAPI's two wire formats, sans I/O: XML-RPC and JSON-RPC calls in, XAPI's answers out.

Values are Python values: str, int, float, bool, list, dict, and `Timestamp` for XAPI's
datetimes. XAPI writes XML-RPC compactly, with its own conventions that clients parse
(`XenAPI.py`, Xen Orchestra's `xen-api`): every int is an int64 and goes out as a string,
an empty string is `<value></value>`, and the answer is a struct {Status, Value} or
{Status: "Failure", ErrorDescription}. JSON-RPC answers follow XAPI's jsonrpc.ml: version 2.0
errors are {code: 1, message: CODE, data: [params]}, version 1.0 ones the bare list.
"""

from __future__ import annotations

import json
import math
import re
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Any
from xml.parsers.expat import ExpatError

MAX_BODY = 1 << 20  # bytes of one RPC request
PROLOG = '<?xml version="1.0"?>'  # as XAPI (ocaml-rpc's xmlrpc.ml) starts every answer


@dataclass(frozen=True)
class Timestamp:
    """A XAPI datetime (UTC, second precision): `<dateTime.iso8601>` in XML-RPC, a string
    in JSON-RPC, both as 20261203T23:19:27Z."""

    seconds: float

    def __str__(self) -> str:
        return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime(self.seconds))


NEVER = Timestamp(0.0)  # XAPI's value for a datetime that has not happened (1970)


@dataclass(frozen=True)
class Call:
    """One decoded request: the method, its positional params, and how to answer it."""

    method: str
    params: list[Any]
    id: Any = None  # JSON-RPC only
    version: str = "2.0"  # JSON-RPC only: "1.0" for requests without "jsonrpc"


class MalformedCall(Exception):
    """The body is not a call at all: answered with the protocol's own fault."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- XML-RPC -------------------------------------------------------------------------------


def decode_xml(body: bytes) -> Call:
    """A <methodCall>; MalformedCall for anything else. Documents with a DTD are refused
    outright: a call never needs one, and entity definitions are how XML bombs work."""
    if b"<!DOCTYPE" in body.upper():
        raise MalformedCall(-32600, "XML-RPC requests must not carry a DTD")
    try:
        params, method = xmlrpc.client.loads(body, use_builtin_types=True)
    except xmlrpc.client.Fault:
        raise MalformedCall(-32600, "a fault is not a request") from None
    except (xmlrpc.client.Error, ExpatError, ValueError, TypeError, LookupError) as exc:
        # Error: an unknown tag (ResponseError); the rest: bad numbers, dates, base64,
        # unbalanced structures, as the unmarshaller meets them.
        raise MalformedCall(-32700, f"the body is not XML-RPC: {exc}") from None
    if not isinstance(method, str) or not method:
        raise MalformedCall(-32600, "the body is not an XML-RPC <methodCall>")
    return Call(method, list(params))


def _xml_value(value: Any, out: list[str]) -> None:
    if isinstance(value, bool):
        out.append(f"<value><boolean>{int(value)}</boolean></value>")
    elif isinstance(value, int):
        out.append(f"<value>{value}</value>")  # XAPI's int64s travel as strings
    elif isinstance(value, float):
        out.append(f"<value><double>{_finite(value):.16g}</double></value>")
    elif isinstance(value, str):
        out.append(f"<value>{_text(value)}</value>")
    elif isinstance(value, Timestamp):
        out.append(f"<value><dateTime.iso8601>{value}</dateTime.iso8601></value>")
    elif isinstance(value, dict):
        out.append("<value><struct>")
        for key, item in value.items():
            out.append(f"<member><name>{_text(str(key))}</name>")
            _xml_value(item, out)
            out.append("</member>")
        out.append("</struct></value>")
    elif isinstance(value, list | tuple):
        out.append("<value><array><data>")
        for item in value:
            _xml_value(item, out)
        out.append("</data></array></value>")
    elif value is None:
        out.append("<value></value>")  # XAPI has no null: an empty string
    else:
        raise TypeError(f"no XML-RPC form for {type(value).__name__}")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
_SPECIAL = re.compile('[&<>"]')


def _text(value: str) -> str:
    """Character data as XAPI writes it: markup characters escaped, and the control
    characters XML 1.0 cannot carry dropped (a client could not parse the answer)."""
    return _SPECIAL.sub(lambda m: _ENTITIES[m.group()], _CONTROL.sub("", value))


def _xml_response(answer: dict) -> bytes:
    out = [PROLOG, "<methodResponse><params><param>"]
    _xml_value(answer, out)
    out.append("</param></params></methodResponse>")
    return "".join(out).encode()


def xml_success(value: Any) -> bytes:
    """XAPI's answer to a call that succeeded."""
    return _xml_response({"Status": "Success", "Value": value})


def xml_failure(description: list[str]) -> bytes:
    """XAPI's answer to a call that failed: [CODE, params...]."""
    return _xml_response({"Status": "Failure", "ErrorDescription": description})


def xml_fault(code: int, message: str) -> bytes:
    """An XML-RPC <fault>: for a body that is not a call (there is no method to fail).
    faultCode is an <int>, as the XML-RPC spec says."""
    return (
        f"{PROLOG}<methodResponse><fault><value><struct>"
        f"<member><name>faultCode</name><value><int>{code}</int></value></member>"
        f"<member><name>faultString</name><value>{_text(message)}</value></member>"
        "</struct></value></fault></methodResponse>"
    ).encode()


# -- JSON-RPC ------------------------------------------------------------------------------


def decode_json(body: bytes) -> Call:
    """A JSON-RPC 2.0 request, or a 1.0 one (no "jsonrpc" member); MalformedCall else."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise MalformedCall(-32700, "the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedCall(-32700, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedCall(-32600, "a JSON-RPC request is an object (batches are not served)")
    method, params = data.get("method"), data.get("params")
    if not isinstance(method, str) or not method:
        raise MalformedCall(-32600, "the request has no method")
    version = "2.0" if data.get("jsonrpc") == "2.0" else "1.0"
    if params is None:
        params = []
    elif isinstance(params, dict):  # as XAPI reads it: one struct parameter
        params = [params]
    if not isinstance(params, list):
        raise MalformedCall(-32602, "XenAPI params are positional: a JSON array")
    return Call(method, params, data.get("id"), version)


def _json_default(value: Any) -> Any:
    if isinstance(value, Timestamp):
        return str(value)
    raise TypeError(f"no JSON form for {type(value).__name__}")


def _dump(answer: dict) -> bytes:
    return json.dumps(answer, default=_json_default, allow_nan=False).encode()


def json_success(call: Call, value: Any) -> bytes:
    """The answer to a call that succeeded, in the request's JSON-RPC version."""
    if call.version == "1.0":
        return _dump({"result": value, "error": None, "id": call.id})
    return _dump({"jsonrpc": "2.0", "result": value, "id": call.id})


def json_failure(call: Call, description: list[str]) -> bytes:
    """XAPI's JSON-RPC errors (api_server.ml): version 2.0 an error object with code 1, the
    XenAPI code as message and its params as data; version 1.0 the bare [CODE, params...]."""
    if call.version == "1.0":
        return _dump({"result": None, "error": description, "id": call.id})
    error = {"code": 1, "message": description[0], "data": description[1:]}
    return _dump({"jsonrpc": "2.0", "error": error, "id": call.id})


def json_fault(code: int, message: str, request_id: Any = None) -> bytes:
    """A JSON-RPC protocol error (parse error, invalid request)."""
    error = {"code": code, "message": message, "data": []}
    return _dump({"jsonrpc": "2.0", "error": error, "id": request_id})
