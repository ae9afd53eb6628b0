"""Raw disk data: the stream's byte N is the disk's byte N."""

from __future__ import annotations

from collections.abc import Iterator

from formats.errors import OutOfBounds


class RawDecoder:
    """Sans-I/O decoder of a raw upload: bytes [0, N) of the stream go to [0, N) of the disk."""

    def __init__(self, virtual_size: int):
        self.virtual_size = virtual_size
        self.position = 0

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, bytes | memoryview]]:
        end = self.position + len(data)
        if end > self.virtual_size:
            raise OutOfBounds(
                f"the upload is larger than the disk: byte {end - 1} is beyond its "
                f"{self.virtual_size} bytes",
                end,
                self.virtual_size,
            )
        yield self.position, data
        self.position = end

    def finish(self) -> None:
        """Nothing can be missing from a raw stream: its length is whatever arrived."""
