"""The layout of an output stream: what each of its bytes is, known before the first is sent.

An encoder describes its whole output as pieces -- literal bytes (headers, tables), ranges of
the disk, runs of zeros -- so the exact length is known up front and any byte range of the
output can be produced on its own. That is what gives Content-Length, Range and resumed
downloads on every export format.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Literal:
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Data:
    """`length` bytes of the disk starting at `offset`."""

    offset: int
    length: int


@dataclass(frozen=True)
class Zero:
    length: int


Piece = Literal | Data | Zero


class Layout:
    def __init__(self, pieces: list[Piece]):
        self.pieces = [p for p in pieces if p.length]
        self.starts: list[int] = []
        pos = 0
        for piece in self.pieces:
            self.starts.append(pos)
            pos += piece.length
        self.length = pos

    def slice(self, start: int, end: int) -> Iterator[Piece]:
        """The pieces covering output bytes [start, end), cut to fit exactly."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"range {start}-{end} outside 0-{self.length}")
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while start < end and i < len(self.pieces):
            piece, piece_start = self.pieces[i], self.starts[i]
            lo = start - piece_start
            hi = min(piece.length, end - piece_start)
            if hi > lo:
                if isinstance(piece, Literal):
                    yield Literal(piece.data[lo:hi])
                elif isinstance(piece, Data):
                    yield Data(piece.offset + lo, hi - lo)
                else:
                    yield Zero(hi - lo)
                start = piece_start + hi
            i += 1


def raw_layout(size: int, data_extents: list[tuple[int, int]]) -> Layout:
    """A raw disk of `size` bytes: its data extents read from disk, holes sent as zeros."""
    pieces: list[Piece] = []
    pos = 0
    for start, length in data_extents:
        if start > pos:
            pieces.append(Zero(start - pos))
        pieces.append(Data(start, length))
        pos = start + length
    if pos < size:
        pieces.append(Zero(size - pos))
    return Layout(pieces)
