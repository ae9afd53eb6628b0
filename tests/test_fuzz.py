"""Issue 13: the parsers that read untrusted bytes, fuzzed. Whatever arrives, a decoder
either decodes or raises FormatError (IMAGE_INVALID at the edge), never anything else, and
never emits more than the image can hold; the edge's header parsers answer 400, never 500.
VHD, QCOW2 and tar have property tests of their own (test_format_*); here are the rest:
XAPI's chunk framing, stream-optimized VMDK (zlib-compressed grains), OVA, and the
request-header parsers."""

from __future__ import annotations

import json
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import ApiError
from formats.chunked import ChunkDecoder, frame_header
from formats.errors import FormatError, OutOfBounds
from formats.events import Header, Write, Zero
from formats.ova import OvaDecoder
from formats.spill import MemorySpill
from formats.vmdk import VmdkStreamDecoder
from transfer.handlers.transfers import _content_range, _upload_complete
from transfer.rpc.wire import Call, MalformedCall, decode_json, decode_xml
from transfer.sizes import parse_size

MiB = 1 << 20
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def drain(decoder, data: bytes, cuts: list[int]) -> list:
    """Feed `data` cut at `cuts`, consuming every event as the pipeline would."""
    events, pos = [], 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        for ev in decoder.feed(data[pos:cut]):
            events.append(ev if not isinstance(ev, Write) else Write(ev.offset, bytes(ev.data)))
        pos = cut
    events.extend(decoder.finish())
    return events


def check_bounds(events: list, size: int) -> None:
    """What the events write lies inside the disk the Header declares (or `size`)."""
    headers = [e for e in events if isinstance(e, Header)]
    limit = headers[0].virtual_size if headers and headers[0].virtual_size is not None else size
    for ev in events:
        if isinstance(ev, Write):
            assert ev.offset + len(ev.data) <= limit
        elif isinstance(ev, Zero):
            assert ev.offset + ev.length <= limit


@FUZZ
@given(
    size=st.integers(0, 4 * MiB),
    frames=st.lists(st.tuples(st.integers(0, 5 * MiB), st.binary(max_size=300)), max_size=5),
    noise=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_chunk_framing(size, frames, noise, cuts):
    stream = b"".join(frame_header(off, len(data)) + data for off, data in frames) + noise
    try:
        events = drain(ChunkDecoder(size), stream, cuts)
    except (FormatError, OutOfBounds):
        return
    written = sum(len(e.data) for e in events if isinstance(e, Write))
    assert written <= len(stream)  # the framing cannot amplify what it was sent


@pytest.fixture(scope="module")
def vmdk_image(tmp_path_factory) -> bytes:
    where = tmp_path_factory.mktemp("vmdk")
    raw = where / "disk.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + bytes(MiB) + b"\x5a" * MiB)
    out = where / "disk.vmdk"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
         str(raw), str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


@FUZZ
@given(
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
    keep=st.floats(0.05, 1.0),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=4),
)
def test_vmdk_stream_mutated(vmdk_image, flips, keep, cuts):
    image = bytearray(vmdk_image[: max(1, int(len(vmdk_image) * keep))])
    for where, byte in flips:
        image[int(where * (len(image) - 1))] = byte
    try:
        events = drain(VmdkStreamDecoder(stream_length=len(image)), bytes(image), cuts)
    except FormatError:
        return
    check_bounds(events, 0)


@FUZZ
@given(bomb=st.integers(1, 64), cuts=st.lists(st.integers(0, 1 << 16), max_size=3))
def test_vmdk_grain_that_inflates_beyond_its_size_is_refused(vmdk_image, bomb, cuts):
    """A grain marker whose zlib data inflates far past a grain (a compression bomb)."""
    image = bytearray(vmdk_image)
    start = _first_grain(image)
    payload = zlib.compress(bytes(bomb * MiB))
    grain = (0).to_bytes(8, "little") + len(payload).to_bytes(4, "little") + payload
    image[start : start + len(grain)] = grain
    try:
        events = drain(VmdkStreamDecoder(stream_length=len(image)), bytes(image), cuts)
    except FormatError:
        return
    check_bounds(events, 0)


def _first_grain(image: bytes) -> int:
    """The offset of the first grain marker: a sector whose marker names a compressed size
    and whose data starts as zlib data does."""
    for at in range(512, len(image) - 16, 512):
        size = int.from_bytes(image[at + 8 : at + 12], "little")
        if 0 < size < 1 << 20 and image[at + 12] == 0x78:
            return at
    raise AssertionError("no grain in the image")


def test_the_bomb_is_a_grain(vmdk_image):
    """The fuzz test below replaces a real grain (else it would test nothing)."""
    image = bytearray(vmdk_image)
    start = _first_grain(image)
    payload = zlib.compress(bytes(8 * MiB))
    image[start + 8 : start + 12 + len(payload)] = len(payload).to_bytes(4, "little") + payload
    with pytest.raises(FormatError, match="inflates beyond"):
        drain(VmdkStreamDecoder(stream_length=len(image)), bytes(image), [])


@FUZZ
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 5000), max_size=4))
def test_ova_garbage(data, cuts):
    try:
        events = drain(OvaDecoder(spill=MemorySpill(), stream_length=len(data)), data, cuts)
    except FormatError:
        return
    check_bounds(events, 0)


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=60))
def test_header_parsers_answer_400_never_crash(value):
    for parse in (_content_range, lambda v: parse_size(v), _upload_complete_of):
        try:
            parse(value)
        except ApiError as exc:
            assert exc.code == "BAD_REQUEST"


def _upload_complete_of(value: str) -> bool:
    class Request:
        headers = {"Upload-Complete": value}

    return _upload_complete(Request(), default=None)  # type: ignore[arg-type]


# -- XenAPI request bodies -----------------------------------------------------------------

XML_CALL = (
    b"<?xml version='1.0'?><methodCall><methodName>VDI.get_record</methodName><params>"
    b"<param><value><string>s</string></value></param><param><value><struct><member>"
    b"<name>a</name><value><array><data><value><i8>5</i8></value><value><double>1.5</double>"
    b"</value><value><boolean>1</boolean></value><value><dateTime.iso8601>20260101T00:00:00"
    b"</dateTime.iso8601></value><value><base64>AAAA</base64></value><value><nil/></value>"
    b"</data></array></value></member></struct></value></param></params></methodCall>"
)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(XML_CALL) - 1), st.integers(0, 255)), max_size=8),
    keep=st.integers(0, len(XML_CALL)),
)
def test_xmlrpc_bodies_decode_or_fault(flips, keep):
    """A mutated XML-RPC call is a call or a MalformedCall (a fault), never a crash."""
    body = bytearray(XML_CALL[:keep])
    for at, value in flips:
        if at < len(body):
            body[at] = value
    try:
        call = decode_xml(bytes(body))
    except MalformedCall:
        return
    assert isinstance(call.method, str) and isinstance(call.params, list)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@FUZZ
@given(
    st.binary(max_size=300)
    | st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES)
    | st.builds(
        lambda m, p, i: json.dumps({"jsonrpc": "2.0", "method": m, "params": p, "id": i}).encode(),
        JSON_VALUES,
        JSON_VALUES,
        JSON_VALUES,
    )
)
def test_jsonrpc_bodies_decode_or_fault(body):
    """Any JSON-RPC body is a call or a MalformedCall (a -32xxx error), never a crash."""
    try:
        call = decode_json(body)
    except MalformedCall:
        return
    assert isinstance(call, Call) and isinstance(call.method, str) and isinstance(call.params, list)
