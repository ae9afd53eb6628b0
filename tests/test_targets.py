"""The import targets against a model of the disk, whatever sizes and offsets the runs and
their buffers have: data lands where it belongs; a zero block (64 KiB aligned to the disk,
cut where a buffer ends) is punched with `punch` and skipped without it (the disk reads zeros
there already: a new VDI, or one a whole image cleared), and then takes no space."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.chain import Chain
from formats.raw_image import RawImage
from transfer.targets import ZERO_BLOCK, ChainTop, RawFile

SIZE = 3 << 20


def apply_model(disk: bytearray, offset: int, parts: list, punch: bool) -> None:
    pos = offset
    for part in parts:
        part = bytes(part)
        at = 0
        while at < len(part):
            stop = min(len(part), at + ZERO_BLOCK - (pos + at) % ZERO_BLOCK)
            piece = part[at:stop]
            if punch or any(piece):
                disk[pos + at : pos + stop] = piece
            at = stop
        pos += len(part)


def pieces(data: bytes, rng: random.Random) -> list:
    """The run as the pipeline hands it over: buffers of any sizes, some memoryviews."""
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 511, 4096, 65536, 256000, len(data)])
        chunk = data[pos : pos + n]
        out.append(memoryview(chunk) if rng.random() < 0.5 else chunk)
        pos += len(chunk)
    return out


run = st.tuples(
    st.integers(0, SIZE - 1),
    st.integers(1, 600_000),
    st.lists(st.sampled_from(["data", "zero"]), min_size=1, max_size=12),
)


def make_target(kind: str, path: str):
    if kind == "raw":
        return RawFile.open(path)
    return ChainTop(Chain([RawImage.open(path, writable=True)]))


@pytest.mark.parametrize("kind", ["raw", "chain"])
@settings(max_examples=25, deadline=None)
@given(
    runs=st.lists(run, min_size=1, max_size=6),
    punch=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_runs_land_as_the_model_says(tmp_path_factory, kind, runs, punch, seed):
    rng = random.Random(seed)
    path = str(tmp_path_factory.mktemp("target") / "disk.raw")
    # With punch, a VDI that holds data everywhere; without, one that reads zeros.
    disk = bytearray(rng.randbytes(SIZE) if punch else bytes(SIZE))
    with open(path, "wb") as f:
        f.truncate(SIZE)
        if punch:
            f.write(disk)
    target = make_target(kind, path)
    try:
        for offset, length, kinds in runs:
            length = min(length, SIZE - offset)
            piece = -(-length // len(kinds))
            data = b"".join(rng.randbytes(piece) if k == "data" else bytes(piece) for k in kinds)[
                :length
            ]
            parts = pieces(data, rng)
            target.write_run(offset, parts, punch)
            apply_model(disk, offset, parts, punch)
        target.flush()
    finally:
        target.close()
    with open(path, "rb") as f:
        assert f.read() == bytes(disk)
    if not punch:  # only the 64 KiB blocks holding data take space
        data_blocks = sum(1 for b in range(0, SIZE, ZERO_BLOCK) if any(disk[b : b + ZERO_BLOCK]))
        assert os.stat(path).st_blocks * 512 <= data_blocks * ZERO_BLOCK


def test_consecutive_runs_at_unaligned_offsets(tmp_path):
    """Runs as a stream hands them over, one after the other: each waits for the one
    before it to be written back and drops its pages."""
    path = tmp_path / "disk.raw"
    size = 20 << 20
    with open(path, "wb") as f:
        f.truncate(size)
    data = random.randbytes(17 << 20)
    target = RawFile.open(path)
    try:
        pos, written = 1234567, 0
        for cut in range(0, len(data), 3_000_001):
            piece = data[cut : cut + 3_000_001]
            written += target.write_run(pos, [piece[:300_001], piece[300_001:]], punch=False)
            pos += len(piece)
        target.flush()
    finally:
        target.close()
    assert written == len(data)
    with open(path, "rb") as f:
        content = f.read()
    assert content[1234567 : 1234567 + len(data)] == data
    assert content[:1234567] == bytes(1234567)
