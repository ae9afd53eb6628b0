"""Raw disk data: the stream's byte N is the disk's byte N."""

from __future__ import annotations

from collections.abc import Iterator

from formats.errors import OutOfBounds
from formats.events import Event, Header, Write


class RawDecoder:
    """Sans-I/O decoder of a raw upload: bytes [0, N) of the stream go to [0, N) of the disk.
    A delta: it changes the bytes it carries (zeros included) and says nothing of the rest,
    nor of the disk's size."""

    def __init__(self, virtual_size: int):
        self.virtual_size = virtual_size
        self.position = 0
        self.started = False  # the Header went out

    def _start(self) -> Iterator[Event]:
        if not self.started:
            self.started = True
            yield Header(None, whole_image=False)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        end = self.position + len(data)
        if end > self.virtual_size:
            raise OutOfBounds(
                f"the upload is larger than the disk: byte {end - 1} is beyond its "
                f"{self.virtual_size} bytes",
                end,
                self.virtual_size,
            )
        yield from self._start()
        yield Write(self.position, data)
        self.position = end

    def finish(self) -> Iterator[Event]:
        """Nothing can be missing from a raw stream: its length is whatever arrived."""
        yield from self._start()
