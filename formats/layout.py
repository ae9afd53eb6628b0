"""The layout of an output stream: what each of its bytes is, known before the first is sent.

An encoder describes its whole output as pieces -- literal bytes (headers, tables), ranges of
the disk, runs of zeros -- so the exact length is known up front and any byte range of the
output can be produced on its own. That is what gives Content-Length, Range and resumed
downloads on every export format.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Literal:
    """Bytes the encoder gives as they are: headers, tables, footers."""

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
    """`length` bytes of zeros."""

    length: int


@dataclass(frozen=True)
class Derived:
    """Bytes computed from the disk: `fn` maps disk bytes [offset, offset + source_length)
    to its output, of which this piece is bytes [start, start + length). For content whose
    size is known up front but whose value needs the data, e.g. a tar checksum member."""

    offset: int
    source_length: int
    fn: Callable[[bytes], bytes]
    length: int
    start: int = 0

    def render(self, source: bytes) -> bytes:
        return self.fn(source)[self.start : self.start + self.length]


Piece = Literal | Data | Zero | Derived


class OutputLayout(Protocol):
    """What every encoder returns. `Layout` below is the simple list-of-pieces one; an
    encoder for huge disks may compute its pieces arithmetically instead of listing them
    (a 2 TiB VHD has a million blocks), as long as it answers these two."""

    length: int

    def slice(self, start: int, end: int) -> Iterator[Piece]:
        """The pieces covering output bytes [start, end), cut to fit exactly, in order."""


class Layout:
    """An OutputLayout that lists its pieces, with where each starts, to slice by bisection."""

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
                yield cut(piece, lo, hi)
                start = piece_start + hi
            i += 1


def cut(piece: Piece, lo: int, hi: int) -> Piece:
    """Bytes [lo, hi) of one piece, as a piece of the same kind."""
    if isinstance(piece, Literal):
        return Literal(piece.data[lo:hi])
    if isinstance(piece, Data):
        return Data(piece.offset + lo, hi - lo)
    if isinstance(piece, Derived):
        return Derived(piece.offset, piece.source_length, piece.fn, hi - lo, piece.start + lo)
    return Zero(hi - lo)


def cut_pieces(pieces: Iterable[Piece], lo: int, hi: int) -> Iterator[Piece]:
    """Bytes [lo, hi) of the concatenation of `pieces`."""
    at = 0
    for piece in pieces:
        piece_end = at + piece.length
        if piece_end > lo and at < hi:
            yield cut(piece, max(lo, at) - at, min(hi, piece_end) - at)
        at = piece_end
        if at >= hi:
            return


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
