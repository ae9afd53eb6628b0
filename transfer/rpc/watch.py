"""XenAPI's event.from over the event log (transfer/events.py).

`classes` are lower-case class names ("task", "vdi", "sr", "host", "pool"), "*" for all, or
"class/ref" for one object. An empty token asks for every watched object as an `add` event;
any other token is the log position of an earlier answer, and the answer holds the changes
after it, one event per object with its record as it is now, or waits up to `timeout`
seconds for one. A token older than the log keeps is EVENTS_LOST: the client starts over
with an empty token, as XAPI's clients do.
"""

from __future__ import annotations

import math
import time
from typing import Any

from common.errors import ApiError
from transfer.rpc.dispatch import XapiError
from transfer.rpc.records import CLASSES, RecordView
from transfer.services import Services

MAX_TIMEOUT = 3600.0  # seconds one event.from call may wait
_NAMES = {cls.lower(): cls for cls in CLASSES}  # wire name -> XenAPI class name


def class_name(wire: str) -> str | None:
    """The XenAPI class a lower-case (or any-case) event class names, None if unknown."""
    return _NAMES.get(wire.lower())


def token_of(position: int) -> str:
    """The token a client passes back for the log position `position`."""
    return str(position)


def _parse_token(token: Any) -> int | None:
    if not isinstance(token, str):
        raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", str(token))
    if token == "":
        return None
    if not token.isdigit():
        raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token)
    return int(token)


class Subscription:
    """What a call watches: whole classes, and single objects by ref."""

    def __init__(self, classes: Any):
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise XapiError("FIELD_TYPE_ERROR", "classes")
        self.classes: set[str] = set()
        self.objects: dict[str, set[str]] = {}
        for entry in classes:
            wire, _, ref = entry.partition("/")
            if wire == "*":
                self.classes.update(CLASSES)
                continue
            cls = class_name(wire)
            if cls is None:
                continue  # a class this server has no objects of: nothing will happen to it
            if ref:
                self.objects.setdefault(cls, set()).add(ref)
            else:
                self.classes.add(cls)

    def watched(self) -> set[str]:
        return self.classes | set(self.objects)

    def wants(self, cls: str, ref: str | None) -> bool:
        return cls in self.classes or (ref is not None and ref in self.objects.get(cls, ()))


def _event(position: int, cls: str, operation: str, ref: str, snapshot: dict | None) -> dict:
    out = {
        "id": position,
        "timestamp": f"{time.time():.6f}",
        "class": cls.lower(),
        "operation": operation,
        "ref": ref,
    }
    if snapshot is not None:
        out["snapshot"] = snapshot
    return out


async def _counts(view: RecordView, sub: Subscription) -> dict[str, int]:
    counts = {}
    for cls in sorted(sub.watched()):
        counts[cls.lower()] = 1 if cls == "pool" else len(await view.rows_of(cls))
    return counts


async def event_from(svc: Services, classes: Any, token: Any, timeout: Any) -> dict:
    """event.from: {events, valid_ref_counts, token}."""
    sub = Subscription(classes)
    position = _parse_token(token)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float | str):
        raise XapiError("FIELD_TYPE_ERROR", "timeout")
    try:
        wait = float(timeout)
    except ValueError:
        raise XapiError("FIELD_TYPE_ERROR", "timeout") from None
    wait = min(max(wait, 0.0), MAX_TIMEOUT) if math.isfinite(wait) else 0.0
    view = RecordView(svc)
    if position is None:
        return await _everything(svc, view, sub)
    deadline = time.monotonic() + wait
    while True:
        try:
            changes = await svc.events.after(position)
        except ApiError as exc:
            raise XapiError(exc.code, token) from None
        if changes:
            position = changes[-1]["id"]
            events = await _changed(view, sub, changes)
            if events:
                return {
                    "events": events,
                    "valid_ref_counts": await _counts(view, sub),
                    "token": token_of(position),
                }
            continue  # nothing of what this call watches: look further
        if not await svc.events.wait(position, deadline):
            return {
                "events": [],
                "valid_ref_counts": await _counts(view, sub),
                "token": token_of(position),
            }


async def _everything(svc: Services, view: RecordView, sub: Subscription) -> dict:
    position = await svc.events.latest()  # before reading: nothing between gets lost
    events = []
    for cls in sorted(sub.watched()):
        for ref, record in (await view.all_of(cls)).items():
            if sub.wants(cls, ref):
                events.append(_event(position, cls, "add", ref, record))
    return {
        "events": events,
        "valid_ref_counts": await _counts(view, sub),
        "token": token_of(position),
    }


async def _changed(view: RecordView, sub: Subscription, changes: list[dict]) -> list[dict]:
    """One event per changed object, in the order of its last change, with its record as
    it is now; objects gone by now are `del` events."""
    last: dict[tuple[str, str], dict] = {}
    for change in changes:
        cls = class_name(change["class"])
        if cls is None:
            continue
        key = (cls, change["uuid"])
        previous = last.pop(key, None)  # re-inserted: ordered by the last change
        first = previous["first"] if previous else change["operation"]
        last[key] = {**change, "first": first}
    events = []
    for (cls, uuid), change in last.items():
        found = await view.one(cls, uuid)
        if found is None:
            ref = change["ref"]
            if ref is None or change["first"] == "add" or not sub.wants(cls, ref):
                continue  # came and went in between, or was never known by ref
            events.append(_event(change["id"], cls, "del", ref, None))
            continue
        ref, record = found
        if not sub.wants(cls, ref):
            continue
        operation = "add" if change["first"] == "add" else "mod"
        events.append(_event(change["id"], cls, operation, ref, record))
    return events
