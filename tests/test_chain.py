"""Chain: layers composed as the database says, checked against a bytearray model."""

from __future__ import annotations

import os

from formats.chain import Chain
from formats.driver import DATA, PARENT, ZERO

KiB = 1024


class ModelLayer:
    """An in-memory layer: per 4 KiB block, data bytes, ZERO, or nothing (PARENT)."""

    def __init__(self, size: int, base: bool):
        self.virtual_size = size
        self.base = base
        self.blocks: dict[int, bytes | None] = {}  # None: zero
        self.fd = -1

    def write(self, offset, data):
        for i in range(0, len(data), 4 * KiB):
            self.blocks[(offset + i) // (4 * KiB)] = bytes(data[i : i + 4 * KiB])

    def zero(self, offset, length):
        for i in range(offset // (4 * KiB), (offset + length) // (4 * KiB)):
            self.blocks[i] = None

    def read(self, offset, length):
        out = bytearray(length)
        for i in range(offset // (4 * KiB), (offset + length) // (4 * KiB)):
            if self.blocks.get(i):
                out[i * 4 * KiB - offset : (i + 1) * 4 * KiB - offset] = self.blocks[i]
        return bytes(out)

    def extents(self, offset=0, length=None):
        length = self.virtual_size - offset if length is None else length
        runs = []
        for i in range(offset // (4 * KiB), (offset + length) // (4 * KiB)):
            kind = (
                (DATA if self.blocks[i] else ZERO)
                if i in self.blocks
                else (ZERO if self.base else PARENT)
            )
            if runs and runs[-1][2] == kind:
                runs[-1] = (runs[-1][0], runs[-1][1] + 4 * KiB, kind)
            else:
                runs.append((i * 4 * KiB, 4 * KiB, kind))
        return runs

    def map(self, offset, length):
        return [(s, n, s + 10**9) for s, n, k in self.extents(offset, length) if k == DATA]


def test_reads_resolve_top_down_and_diff_above_base():
    size = 64 * KiB
    base, mid, top = ModelLayer(size, True), ModelLayer(size, False), ModelLayer(size, False)
    a, b, c = os.urandom(16 * KiB), os.urandom(8 * KiB), os.urandom(4 * KiB)
    base.write(0, a)  # [0, 16K) data in the base
    mid.write(8 * KiB, b)  # [8K, 16K) overwritten in the middle
    top.zero(0, 4 * KiB)  # [0, 4K) zeroed on top
    top.write(32 * KiB, c)  # [32K, 36K) new data on top
    chain = Chain([top, mid, base])
    expected = bytearray(size)
    expected[0 : 16 * KiB] = a
    expected[8 * KiB : 16 * KiB] = b
    expected[0 : 4 * KiB] = bytes(4 * KiB)
    expected[32 * KiB : 36 * KiB] = c
    assert chain.read(0, size) == bytes(expected)
    assert chain.read(4 * KiB, 8 * KiB) == bytes(expected[4 * KiB : 12 * KiB])
    assert chain.extents() == [
        (0, 4 * KiB, ZERO),
        (4 * KiB, 12 * KiB, DATA),
        (16 * KiB, 16 * KiB, ZERO),
        (32 * KiB, 4 * KiB, DATA),
        (36 * KiB, 28 * KiB, ZERO),
    ]
    # Reading from the parent of the top (what a copy-on-write needs).
    assert chain.read(0, 4 * KiB, first=1) == a[: 4 * KiB]
    # Since the base: everything mid and top touched, with what the disk reads now.
    assert chain.changed_above(2) == [
        (0, 4 * KiB, ZERO),
        (8 * KiB, 8 * KiB, DATA),  # [4K, 8K) is the base's, untouched since
        (32 * KiB, 4 * KiB, DATA),
    ]
    # Since mid (a snapshot): only what top touched.
    assert chain.changed_above(1) == [(0, 4 * KiB, ZERO), (32 * KiB, 4 * KiB, DATA)]
    # Segments point at the layer that holds each data run.
    segs = chain.segments(0, 16 * KiB)
    assert segs[0] == (0, 4 * KiB, None, 0)
    assert (8 * KiB, 8 * KiB, 1, 8 * KiB + 10**9) in segs
