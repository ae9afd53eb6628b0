"""XAPI's chunk framing for raw disk data (vhd-tool's "chunked" protocol).

The stream is a sequence of frames, each a 12-byte header -- u64 little-endian byte offset,
u32 little-endian length -- followed by `length` bytes of data for that offset, ended by a
header of 12 zero bytes. Frames may come in any order.

`ChunkDecoder` is sans-I/O: feed it bytes as they arrive, get `Write` events back (after one
`Header`: a framed stream is a delta of unknown disk size).
`frames_layout` is the encoder: the exact bytes of a framed stream carrying given extents.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from formats.errors import FramingError, OutOfBounds
from formats.events import Event, Header, Write
from formats.layout import Data, Layout, Literal

HEADER = struct.Struct("<QI")
HEADER_SIZE = HEADER.size  # 12
TERMINATOR = bytes(HEADER_SIZE)
# vhd-tool sends frames of at most 2 MiB and XAPI's importer wants 512-byte multiples;
# we send the same so that our exports import into XAPI too.
MAX_FRAME = 2 << 20


def frame_header(offset: int, length: int) -> bytes:
    """The 12-byte header of a frame carrying `length` bytes for disk offset `offset`."""
    return HEADER.pack(offset, length)


class ChunkDecoder:
    """Turns a framed stream into writes. `feed` returns the writes its bytes complete;
    data is handed out as soon as it arrives, so a frame of any size needs no buffering."""

    def __init__(self, virtual_size: int):
        self.virtual_size = virtual_size
        self._header = bytearray()
        self._offset = 0  # where the next data byte of the current frame goes
        self._remaining = 0  # data bytes still due in the current frame
        self.frames = 0
        self.done = False  # the terminator was seen
        self.started = False  # the Header went out

    @property
    def mid_frame(self) -> bool:
        return bool(self._header) or self._remaining > 0

    def _start(self) -> Iterator[Event]:
        if not self.started:
            self.started = True
            yield Header(None, whole_image=False)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        yield from self._start()
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self.done:
                raise FramingError(
                    f"{len(view) - pos} bytes follow the terminating frame of the chunk framing"
                )
            if self._remaining:
                take = min(self._remaining, len(view) - pos)
                yield Write(self._offset, view[pos : pos + take])
                self._offset += take
                self._remaining -= take
                pos += take
                continue
            need = HEADER_SIZE - len(self._header)
            if not self._header and len(view) - pos >= HEADER_SIZE:
                offset, length = HEADER.unpack_from(view, pos)
                pos += HEADER_SIZE
            else:
                self._header += view[pos : pos + need]
                pos += min(need, len(view) - pos)
                if len(self._header) < HEADER_SIZE:
                    continue
                offset, length = HEADER.unpack(self._header)
                self._header.clear()
            self._start_frame(offset, length)

    def _start_frame(self, offset: int, length: int) -> None:
        if offset == 0 and length == 0:
            self.done = True
            return
        end = offset + length
        if end > self.virtual_size:
            raise OutOfBounds(
                f"frame {self.frames} writes bytes {offset}-{end - 1}, beyond the disk's "
                f"{self.virtual_size} bytes",
                end,
                self.virtual_size,
            )
        self.frames += 1
        self._offset = offset
        self._remaining = length

    def finish(self) -> Iterator[Event]:
        """The stream ended: it must have ended on the terminator."""
        yield from self._start()
        if not self.done:
            where = "in the middle of a frame" if self.mid_frame else "before the terminator"
            raise FramingError(f"the chunk-framed body ended {where} (after {self.frames} frames)")


def frames_layout(extents: Iterable[tuple[int, int]], max_frame: int = MAX_FRAME) -> Layout:
    """The framed stream carrying `extents` [(offset, length)] of the disk, in order."""
    pieces: list = []
    for start, length in extents:
        pos, end = start, start + length
        while pos < end:
            n = min(max_frame, end - pos)
            pieces.append(Literal(frame_header(pos, n)))
            pieces.append(Data(pos, n))
            pos += n
    pieces.append(Literal(TERMINATOR))
    return Layout(pieces)
