"""A VDI as the stack of its layers, top first: what a reader of the VDI sees.

The service builds a Chain from its database (never from names inside the files) and asks
it for the disk's bytes, its data/zero map, where each run of data physically lives (for
sendfile), and what changed above a base layer (for incremental exports).
"""

from __future__ import annotations

from collections.abc import Sequence

from formats.driver import DATA, PARENT, ZERO, ImageDriver

Segment = tuple[int, int, int | None, int]  # virtual offset, length, layer index or None, host
READ = -1  # a segment's host offset when its data must be read (and decoded) by the driver


class Chain:
    """The layers of one VDI, top first, read as the one disk a reader of the VDI sees."""

    def __init__(self, layers: Sequence[ImageDriver]):
        if not layers:
            raise ValueError("a chain needs at least one layer")
        self.layers = list(layers)
        self.virtual_size = self.layers[0].virtual_size

    @property
    def top(self) -> ImageDriver:
        return self.layers[0]

    def _resolve(self, offset: int, length: int, first: int = 0):
        """(start, length, layer index, kind) runs covering the range, each taken from the
        highest layer (from `first` down) that says anything about it."""
        pending = [(offset, length)]
        for index in range(first, len(self.layers)):
            layer = self.layers[index]
            below = []
            for start, n in pending:
                for run_start, run_len, kind in layer.extents(start, n):
                    if kind == PARENT:
                        below.append((run_start, run_len))
                    else:
                        yield run_start, run_len, index, kind
            pending = below
            if not pending:
                return
        for start, n in pending:  # below the base layer: zeros
            yield start, n, None, ZERO

    def read(self, offset: int, length: int, first: int = 0) -> bytes:
        """The disk's bytes as seen from layer `first` down (1: the parent of the top)."""
        runs = list(self._resolve(offset, length, first))
        if len(runs) == 1 and runs[0][3] == DATA and runs[0][2] is not None:
            return self.layers[runs[0][2]].read(offset, length)  # one layer holds it all
        out = bytearray(length)
        for start, n, index, kind in runs:
            if kind == DATA and index is not None:
                out[start - offset : start - offset + n] = self.layers[index].read(start, n)
        return bytes(out)

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, str]]:
        """DATA / ZERO runs of the disk as a reader sees it, in order, coalesced."""
        length = self.virtual_size - offset if length is None else length
        runs = sorted((s, n, kind) for s, n, _, kind in self._resolve(offset, length))
        return coalesce(runs)

    def segments(self, offset: int, length: int) -> list[Segment]:
        """Where the range's bytes live: (virtual offset, length, layer, host offset) for
        data, host READ where the layer must decode it (no raw host range), and
        (virtual offset, length, None, 0) for zeros; in order."""
        out: list[Segment] = []
        for start, n, index, kind in sorted(self._resolve(offset, length)):
            if kind == DATA and index is not None:
                pos = start
                for v, m, host in self.layers[index].map(start, n):
                    if v > pos:  # data with no host range (a compressed cluster): read it
                        out.append((pos, v - pos, index, READ))
                    out.append((v, m, index, host))
                    pos = v + m
                if pos < start + n:
                    out.append((pos, start + n - pos, index, READ))
            else:
                out.append((start, n, None, 0))
        out.sort()
        return out

    def changed_above(self, depth: int) -> list[tuple[int, int, str]]:
        """The ranges the top `depth` layers say anything about (everything that can differ
        from the disk as layer `depth` and below show it), as DATA / ZERO runs of what the
        disk reads there now."""
        return self.reads_over(self.touched(depth))

    def touched(self, depth: int) -> list[tuple[int, int]]:
        """(start, length) of every run the top `depth` layers hold DATA or ZERO for."""
        spans: list[tuple[int, int]] = []
        for layer in self.layers[:depth]:
            spans.extend((s, n) for s, n, kind in layer.extents() if kind != PARENT)
        return spans

    def reads_over(self, spans: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """DATA / ZERO runs of what the disk reads over `spans` (merged first)."""
        out: list[tuple[int, int, str]] = []
        for start, n in union_spans(spans):
            out.extend(self.extents(start, n))
        return coalesce(out)


def coalesce(runs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Runs (in order) with neighbours of the same kind merged and empty runs dropped."""
    out: list[tuple[int, int, str]] = []
    for start, n, kind in runs:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n, kind)
        elif n:
            out.append((start, n, kind))
    return out


def union_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, merged spans."""
    out: list[tuple[int, int]] = []
    for start, n in sorted(spans):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(start + n, out[-1][0] + out[-1][1]) - out[-1][0])
        elif n:
            out.append((start, n))
    return out
