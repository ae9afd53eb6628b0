"""The qcow2 image driver against a bytearray model, qemu and the streaming decoder.

Random sequences of write / zero / flush / reopen are checked after every few steps with
read(), extents() and map() (the host ranges map() gives are read from the file), and at the
end with `qemu-img check` (no errors, no leaks), `qemu-img compare` and Qcow2Decoder (which
must decode the driver's files to the same disk). Layers with a backing file are checked
through qemu following the backing name. A crash is simulated at every write the driver
makes, with the writes since the last fdatasync kept or lost at random. Damaged images must
be refused with precise errors.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.driver import DATA, PARENT, ZERO
from formats.errors import FormatError
from formats.qcow2_image import Qcow2Image
from tests.qcow2_tools import HAVE_QEMU, decode, run

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
COPIED = 1 << 63
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-io")
_EXAMPLES = itertools.count()


# -- oracles -------------------------------------------------------------------------------


def qemu_check(path: Path, *, leaks: bool = False) -> dict:
    """qemu-img check finds no error (and no leak unless allowed)."""
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
    )
    info = json.loads(result.stdout)
    assert info["check-errors"] == 0, result.stdout + result.stderr
    assert not info.get("corruptions"), result.stdout + result.stderr
    if not leaks:
        assert not info.get("leaks") and result.returncode == 0, result.stdout + result.stderr
    return info


def qemu_compare(image: Path, expected: bytes, tmp_path: Path) -> None:
    """qemu reads the image (following its backing file) as exactly `expected`."""
    raw = tmp_path / f"expected-{image.stem}.raw"
    raw.write_bytes(expected)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)
    raw.unlink()


def verify(
    image: Qcow2Image,
    disk: bytes | bytearray,
    parent: bytes | None = None,
    rng: random.Random | None = None,
    *,
    compressed: bool = False,
) -> None:
    """The layer read through read/extents/map, composed over `parent`, is `disk`; ranges
    asked for in pieces give the same answers cut to the range. map() covers all the data
    unless some is in compressed clusters."""
    size = image.virtual_size
    layer = image.read(0, size)
    runs = image.extents()
    assert runs and runs[0][0] == 0 and sum(n for _, n, _ in runs) == size
    pos = 0
    for (start, n, kind), following in zip(runs, [*runs[1:], None], strict=True):
        assert start == pos and n > 0
        assert following is None or following[2] != kind, "runs are coalesced"
        pos += n
        here = bytes(disk[start : start + n])
        if kind == DATA:
            assert layer[start : start + n] == here
        elif kind == ZERO:
            assert here == bytes(n) and layer[start : start + n] == bytes(n)
        else:
            assert kind == PARENT and parent is not None
            assert here == parent[start : start + n] and layer[start : start + n] == bytes(n)
    mapped = image.map(0, size)
    data_runs = [(s, n) for s, n, kind in runs if kind == DATA]
    if not compressed:
        assert sum(n for _, n, _ in mapped) == sum(n for _, n in data_runs)
    for v, n, host in mapped:
        assert os.pread(image.fd, n, host) == disk[v : v + n]
        assert any(s <= v and v + n <= s + m for s, m in data_runs)
    for a, b in itertools.pairwise(mapped):
        assert a[0] + a[1] <= b[0]
        assert not (a[0] + a[1] == b[0] and a[2] + a[1] == b[2]), "host runs are merged"
    rng = rng or random.Random(0)
    for _ in range(4):
        start = rng.randrange(size)
        n = rng.randrange(size - start + 1)
        assert image.read(start, n) == layer[start : start + n]
        assert image.extents(start, n) == clip(runs, start, n)
        assert image.map(start, n) == clip(mapped, start, n)


def clip(runs: list, start: int, n: int) -> list:
    out = []
    for run_start, length, extra in runs:
        lo, hi = max(start, run_start), min(start + n, run_start + length)
        if lo < hi:
            out.append((lo, hi - lo, extra + lo - run_start if isinstance(extra, int) else extra))
    return out


def decoded(path: Path, base: bytes | None = None) -> bytes:
    disk, _, _ = decode(path.read_bytes(), base)
    return bytes(disk)


# -- random operations ---------------------------------------------------------------------


def pick_range(rng: random.Random, size: int, cs: int) -> tuple[int, int]:
    """Ranges that hit cluster boundaries, whole clusters, tiny and large pieces."""
    r = rng.random()
    if r < 0.3:
        start = rng.randrange(0, -(-size // cs)) * cs
        n = rng.randint(1, 5) * cs
    elif r < 0.55:
        start = rng.randrange(size)
        n = rng.randrange(1, 3 * cs)
    elif r < 0.65:
        start = rng.randrange(size // 2)
        n = rng.randrange(1, size // 3)
    elif r < 0.75:
        start = size - rng.randrange(1, 2 * cs)
        n = size
    else:
        start = rng.randrange(size)
        n = rng.randrange(1, 2000)
    start = max(0, start)
    return start, min(n, size - start)


def payload(rng: random.Random, n: int) -> bytes:
    r = rng.random()
    if r < 0.1:
        return bytes(n)  # zeros written as data
    if r < 0.2:
        return bytes([rng.randrange(1, 256)]) * n
    return rng.randbytes(n)


def random_session(
    path: Path,
    image: Qcow2Image,
    disk: bytearray,
    rng: random.Random,
    steps: int,
    *,
    parent: bytes | None = None,
    reopen: Callable[[], Qcow2Image] | None = None,
) -> Qcow2Image:
    size, cs = image.virtual_size, image.cluster_size
    for step in range(steps):
        r = rng.random()
        if r < 0.55:
            start, n = pick_range(rng, size, cs)
            data = payload(rng, n)
            image.write(start, data)
            disk[start : start + n] = data
        elif r < 0.85:
            start, n = pick_range(rng, size, cs)
            image.zero(start, n)
            disk[start : start + n] = bytes(n)
        elif r < 0.93:
            image.flush()
        else:
            image.close()
            image = reopen() if reopen else Qcow2Image.open(path, writable=True)
        if step % 20 == 19:
            verify(image, disk, parent, rng)
    verify(image, disk, parent, rng)
    return image


@needs_qemu
@pytest.mark.parametrize(
    "cluster_size, size, seed, small_caches",
    [
        (512, 3 * MiB + 3 * 512, 1, True),
        (4096, 5 * MiB, 2, True),
        (65536, 9 * MiB + 4096, 3, False),
        (65536, 24 * MiB, 4, True),
    ],
)
def test_random_operations_match_the_model(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cluster_size: int,
    size: int,
    seed: int,
    small_caches: bool,
) -> None:
    if small_caches:  # 4 L2 tables and 4 refcount blocks: evictions all the time
        monkeypatch.setattr(Qcow2Image, "l2_cache_bytes", 0)
        monkeypatch.setattr(Qcow2Image, "refcount_cache_bytes", 0)
    rng = random.Random(seed)
    path = tmp_path / "disk.qcow2"
    image = Qcow2Image.create(path, size, cluster_size=cluster_size)
    disk = bytearray(size)
    image = random_session(path, image, disk, rng, 120)
    image.close()
    qemu_check(path)
    qemu_compare(path, bytes(disk), tmp_path)
    assert decoded(path) == disk


@given(
    operations=st.lists(
        st.tuples(
            st.sampled_from(["write", "zero", "flush", "reopen"]),
            st.integers(0, 40 * 512),
            st.integers(0, 6 * 512),
            st.integers(0, 255),
        ),
        max_size=25,
    )
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_hypothesis_operations(tmp_path: Path, operations: list) -> None:
    """Small disks with 512-byte clusters (a table covers 32 KiB): the model, the decoder."""
    size = 40 * 512 + 512 * 64 * 2  # past two L2 tables
    path = tmp_path / f"h{next(_EXAMPLES)}.qcow2"  # the fixture is shared by examples
    image = Qcow2Image.create(path, size, cluster_size=512)
    disk = bytearray(size)
    for op, start, n, fill in operations:
        start = start * 7 % size
        n = min(n, size - start)
        if op == "write":
            data = bytes([fill]) * n
            image.write(start, data)
            disk[start : start + n] = data
        elif op == "zero":
            image.zero(start, n)
            disk[start : start + n] = bytes(n)
        elif op == "flush":
            image.flush()
        else:
            image.close()
            image = Qcow2Image.open(path, writable=True)
    verify(image, disk)
    image.close()
    assert decoded(path) == disk
    path.unlink()


# -- backing chains ------------------------------------------------------------------------


def make_parent(tmp_path: Path, fmt: str, size: int, rng: random.Random) -> tuple[Path, bytes]:
    parent = bytearray(size)
    for _ in range(12):
        start, n = pick_range(rng, size, 4096)
        parent[start : start + n] = rng.randbytes(n)
    if fmt == "raw":
        path = tmp_path / "parent.raw"
        path.write_bytes(parent)
    else:
        path = tmp_path / "parent.qcow2"
        with Qcow2Image.create(path, size) as image:
            image.write(0, parent)
            image.zero(size // 2, size // 4)  # zero clusters in the parent, too
        parent[size // 2 : size // 2 + size // 4] = bytes(size // 4)
    return path, bytes(parent)


@needs_qemu
@pytest.mark.parametrize("parent_format", ["raw", "qcow2"])
@pytest.mark.parametrize("cluster_size, seed", [(4096, 5), (65536, 6)])
def test_child_over_a_parent(
    tmp_path: Path, parent_format: str, cluster_size: int, seed: int
) -> None:
    rng = random.Random(seed)
    size = 3 * MiB + 5 * 512
    parent_path, parent = make_parent(tmp_path, parent_format, size, rng)

    def read_parent(offset: int, length: int) -> bytes:
        return parent[offset : offset + length]

    path = tmp_path / "child.qcow2"
    image = Qcow2Image.create(
        path,
        size,
        backing=parent_path.name,
        backing_format=parent_format,
        cluster_size=cluster_size,
        read_parent=read_parent,
    )
    assert image.extents() == [(0, size, PARENT)]
    disk = bytearray(parent)

    def reopen() -> Qcow2Image:
        reopened = Qcow2Image.open(path, writable=True)
        reopened.read_parent = read_parent  # as the service sets it
        return reopened

    image = random_session(path, image, disk, rng, 100, parent=parent, reopen=reopen)
    image.close()
    qemu_check(path)
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert info["backing-filename"] == parent_path.name
    assert info["backing-filename-format"] == parent_format
    qemu_compare(path, bytes(disk), tmp_path)
    assert decoded(path, parent) == disk


@needs_qemu
def test_zero_clusters_mask_the_parent(tmp_path: Path) -> None:
    cs = 65536
    size = 1 * MiB
    parent = b"\xaa" * size
    (tmp_path / "base.raw").write_bytes(parent)
    path = tmp_path / "child.qcow2"
    with Qcow2Image.create(path, size, backing="base.raw", backing_format="raw") as image:
        image.read_parent = lambda offset, length: parent[offset : offset + length]
        image.zero(cs, 3 * cs)
        image.zero(6 * cs + 100, 50)  # a partial cluster: copied from the parent, zeroed
        assert image.extents() == [
            (0, cs, PARENT),
            (cs, 3 * cs, ZERO),
            (4 * cs, 2 * cs, PARENT),
            (6 * cs, cs, DATA),
            (7 * cs, size - 7 * cs, PARENT),
        ]
        assert image.read(6 * cs, cs) == b"\xaa" * 100 + bytes(50) + b"\xaa" * (cs - 150)
    expected = bytearray(parent)
    expected[cs : 4 * cs] = bytes(3 * cs)
    expected[6 * cs + 100 : 6 * cs + 150] = bytes(50)
    qemu_check(path)
    qemu_compare(path, bytes(expected), tmp_path)


@needs_qemu
def test_partial_writes_need_the_parent(tmp_path: Path) -> None:
    """Without read_parent a partial write into a cluster the parent holds is refused
    before anything changes; whole clusters and clusters the layer holds need nothing."""
    cs = 65536
    parent = b"\x55" * (4 * cs)
    (tmp_path / "base.raw").write_bytes(parent)
    path = tmp_path / "child.qcow2"
    with Qcow2Image.create(path, 4 * cs, backing="base.raw", backing_format="raw") as image:
        length = os.fstat(image.fd).st_size
        with pytest.raises(ValueError, match="read_parent"):
            image.write(cs + 10, b"x" * 10)
        with pytest.raises(ValueError, match="read_parent"):
            image.zero(10, 10)
        with pytest.raises(ValueError, match="read_parent"):
            image.write(cs - 10, b"x" * (cs + 20))  # one whole cluster, two partial
        assert image.extents() == [(0, 4 * cs, PARENT)]
        assert os.fstat(image.fd).st_size == length  # not even an L2 table was allocated
        image.write(cs, b"y" * cs)
        image.write(cs + 10, b"x" * 10)  # in place
        image.zero(2 * cs, cs)
        image.read_parent = lambda offset, length: b"short"
        with pytest.raises(ValueError, match="returned 5 bytes"):
            image.write(3 * cs, b"z")
    expected = bytearray(parent)
    expected[cs : 2 * cs] = b"y" * 10 + b"x" * 10 + b"y" * (cs - 20)
    expected[2 * cs : 3 * cs] = bytes(cs)
    qemu_check(path)
    qemu_compare(path, bytes(expected), tmp_path)


# -- crash safety --------------------------------------------------------------------------


class Crash(Exception):
    pass


class PowerCut:
    """Stands between the driver and its file: every write and truncate reaches the file
    (the driver reads its own writes) and is logged; what fdatasync made durable is kept
    apart. After the crash, the image on the platter is the durable bytes plus any subset
    of the writes since the last fdatasync."""

    def __init__(self, image: Qcow2Image, fail_at: int):
        self.image = image
        self.fail_at = fail_at
        self.calls = 0
        self.durable = bytearray(os.pread(image.fd, 1 << 30, 0))
        self.pending: list[tuple[int, bytes | int]] = []
        self.real_pwrite = image._pwrite
        self.real_truncate = image._truncate
        image._pwrite = self.pwrite  # type: ignore[method-assign]
        image._truncate = self.truncate  # type: ignore[method-assign]
        image._sync = self.sync  # type: ignore[method-assign]

    def tick(self) -> None:
        if self.calls == self.fail_at:
            raise Crash
        self.calls += 1

    def pwrite(self, offset: int, *pieces) -> None:
        self.tick()
        self.real_pwrite(offset, *pieces)
        self.pending.append((offset, b"".join(bytes(p) for p in pieces)))

    def truncate(self, size: int) -> None:
        self.tick()
        self.real_truncate(size)
        self.pending.append((size, -1))

    def sync(self) -> None:
        self.durable = self.platter(self.pending)
        self.pending = []
        self.image._unsynced = False

    def platter(self, writes: list) -> bytearray:
        out = bytearray(self.durable)
        for offset, data in writes:
            if data == -1:
                out.extend(bytes(max(0, offset - len(out))))
            else:
                out.extend(bytes(max(0, offset + len(data) - len(out))))
                out[offset : offset + len(data)] = data
        return out


def crash_scenario(image: Qcow2Image, new: dict[int, bytes]) -> None:
    """Each cluster touched once, so every cluster must read old or new after a crash.
    The new data (host past 8 MiB) makes refcount blocks and a larger refcount table."""
    cs = image.cluster_size
    image.write(0, new[0])  # in place
    image.zero(MiB, 128 * KiB)  # frees clusters
    image.write(10 * MiB, new[10 * MiB])  # L2 tables, refcount blocks, refcount table
    image.flush()
    image.write(12 * MiB + cs // 2, new[12 * MiB + cs // 2])  # partial clusters
    image.zero(2 * MiB, 8 * KiB)
    image.write(3 * MiB, new[3 * MiB])
    image.flush()


@needs_qemu
@pytest.mark.parametrize("small_caches", [False, True])
def test_a_crash_at_any_write_leaves_a_consistent_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_caches: bool
) -> None:
    """Without tiny caches, the file grows past what its refcount table covers; with them,
    evictions write tables back in the middle of operations."""
    if small_caches:
        monkeypatch.setattr(Qcow2Image, "l2_cache_bytes", 0)
        monkeypatch.setattr(Qcow2Image, "refcount_cache_bytes", 0)
    cs = 512
    size = 16 * MiB
    rng = random.Random(7)
    base_path = tmp_path / "base.qcow2"
    old = bytearray(size)
    used = 3 * MiB if small_caches else 7 * MiB + 600 * KiB  # just fits the table's 8 MiB
    old[:used] = rng.randbytes(used)
    with Qcow2Image.create(base_path, size, cluster_size=cs) as image:
        image.write(0, old[:used])
    new_bytes = {
        0: rng.randbytes(64 * KiB),
        10 * MiB: rng.randbytes(400 * KiB),
        12 * MiB + cs // 2: rng.randbytes(3 * cs),
        3 * MiB: rng.randbytes(8 * KiB),
    }
    new = bytearray(old)
    for start, data in new_bytes.items():
        new[start : start + len(data)] = data
    new[MiB : MiB + 128 * KiB] = bytes(128 * KiB)
    new[2 * MiB : 2 * MiB + 8 * KiB] = bytes(8 * KiB)
    base = base_path.read_bytes()
    assert struct.unpack_from(">I", base, 56)[0] == 1
    touched = [c for c in range(0, size, cs) if old[c : c + cs] != new[c : c + cs]]

    def attempt(fail_at: int) -> PowerCut | None:
        path = tmp_path / "crash.qcow2"
        path.write_bytes(base)
        image = Qcow2Image.open(path, writable=True)
        cut = PowerCut(image, fail_at)
        try:
            crash_scenario(image, new_bytes)
        except Crash:
            os.close(image.fd)
            return cut
        image.close()
        # Without a crash: no leak, the table moved, and the image reads as `new`.
        qemu_check(path)
        with Qcow2Image.open(path, writable=False) as done:
            assert done.read(0, size) == new
        moved = struct.unpack_from(">QI", path.read_bytes(), 48) != struct.unpack_from(
            ">QI", base, 48
        )
        assert moved != small_caches
        return None

    fail_at = 0
    crashes = 0
    while (cut := attempt(fail_at)) is not None:
        crashes += 1
        keep_all = list(cut.pending)
        keep_some = [w for w in cut.pending if rng.random() < 0.5]
        for variant, writes in (("all", keep_all), ("some", keep_some)):
            path = tmp_path / f"after-{variant}.qcow2"
            path.write_bytes(cut.platter(writes))
            qemu_check(path, leaks=True)
            reuse = variant == "all" and crashes % 4 == 1
            with Qcow2Image.open(path, writable=reuse) as image:
                got = image.read(0, size)
                expected = bytearray(old)
                for c in touched:
                    assert got[c : c + cs] in (old[c : c + cs], new[c : c + cs]), (fail_at, c)
                    expected[c : c + cs] = got[c : c + cs]
                assert got == expected, fail_at
                if reuse:  # the image stays usable
                    image.write(5 * MiB, b"after" * 1000)
            if reuse:
                qemu_check(path, leaks=True)
        fail_at += 1 if fail_at < 40 else 1 + fail_at // 20
    assert crashes > 30


# -- imported and foreign images -----------------------------------------------------------


def compressible(rng: random.Random, size: int) -> bytes:
    return b"".join(bytes([rng.randrange(4)]) * 512 + rng.randbytes(64) for _ in range(size // 576))


@needs_qemu
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters(tmp_path: Path, compression: str) -> None:
    rng = random.Random(8)
    size = 2 * MiB
    disk = bytearray(compressible(rng, size).ljust(size, b"\x01"))
    raw = tmp_path / "in.raw"
    raw.write_bytes(disk)
    path = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}",
        raw, path)  # fmt: skip
    with Qcow2Image.open(path, writable=False) as image:
        assert image.read(0, size) == disk
        assert b"".join(image.read(pos, 4096) for pos in range(0, size, 4096)) == disk
        assert image.extents() == [(0, size, DATA)]
        assert image.map(0, size) == []  # nothing to sendfile: read() it
    with Qcow2Image.open(path, writable=True) as image:
        image.write(100_000, b"new" * 1000)  # a partial write into compressed clusters
        disk[100_000:103_000] = b"new" * 1000
        image.zero(65536 * 5, 65536 * 2)
        disk[65536 * 5 : 65536 * 7] = bytes(65536 * 2)
        image.zero(65536 * 9 + 7, 1000)
        disk[65536 * 9 + 7 : 65536 * 9 + 1007] = bytes(1000)
        verify(image, disk, compressed=True)
        assert [(v, n) for v, n, _ in image.map(0, size)] == [(65536, 65536), (9 * 65536, 65536)]
    qemu_check(path)
    qemu_compare(path, bytes(disk), tmp_path)


@needs_qemu
def test_images_qemu_made(tmp_path: Path) -> None:
    """Metadata preallocation, data written by qemu-io, and zero clusters that keep their
    host clusters (write -z without unmap)."""
    path = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 70000 200000", "-c", "write -z 2M 128k", path)
    disk = bytearray(4 * MiB)
    disk[70000:270000] = b"\x07" * 200000
    with Qcow2Image.open(path, writable=True) as image:
        verify(image, disk)
        assert image.extents(2 * MiB - 1, 65536) == [
            (2 * MiB - 1, 1, DATA),
            (2 * MiB, 65535, ZERO),
        ]
        size_before = os.fstat(image.fd).st_size
        image.write(2 * MiB + 5, b"in the preallocated cluster")  # its own host cluster
        disk[2 * MiB + 5 : 2 * MiB + 32] = b"in the preallocated cluster"
        image.zero(3 * MiB, MiB)
        disk[3 * MiB :] = bytes(MiB)
        verify(image, disk)
        assert os.fstat(image.fd).st_size == size_before
    qemu_check(path)
    qemu_compare(path, bytes(disk), tmp_path)


@needs_qemu
def test_version_2_images_are_read_only(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 9 1000 5000", path)
    with Qcow2Image.open(path, writable=False) as image:
        assert image.version == 2
        assert image.read(0, 8000) == bytes(1000) + b"\x09" * 5000 + bytes(2000)
    with pytest.raises(FormatError, match="version 2 images can only be opened read-only"):
        Qcow2Image.open(path, writable=True)


# -- layout and performance ----------------------------------------------------------------


@needs_qemu
def test_create(tmp_path: Path) -> None:
    path = tmp_path / "child.qcow2"
    image = Qcow2Image.create(
        path, 10 * MiB, backing="parent.qcow2", backing_format="qcow2", cluster_size=4096
    )
    image.close()
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert info["virtual-size"] == 10 * MiB
    assert info["cluster-size"] == 4096
    assert info["backing-filename"] == "parent.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    with Qcow2Image.open(path, writable=False) as image:
        assert (image.backing_file, image.backing_format) == ("parent.qcow2", "qcow2")
        assert image.extents() == [(0, 10 * MiB, PARENT)]
        assert image.map(0, 10 * MiB) == []
        with pytest.raises(ValueError, match="read-only"):
            image.write(0, b"x")
    with pytest.raises(FileExistsError):
        Qcow2Image.create(path, MiB)
    for kwargs, message in [
        ({"backing": "../up.qcow2"}, "not a file name"),
        ({"backing": ""}, "not a file name"),
        ({"backing": "p", "backing_format": "vmdk"}, "not raw or qcow2"),
        ({"backing_format": "raw"}, "without a backing file"),
        ({"cluster_size": 3000}, "power of two"),
    ]:
        with pytest.raises(ValueError, match=message):
            Qcow2Image.create(tmp_path / "bad.qcow2", MiB, **kwargs)
    with pytest.raises(ValueError, match="multiple of 512"):
        Qcow2Image.create(tmp_path / "bad.qcow2", MiB + 1)
    assert not (tmp_path / "bad.qcow2").exists()
    with Qcow2Image.create(tmp_path / "base.qcow2", MiB) as base:
        assert base.backing_file is None
        assert base.extents() == [(0, MiB, ZERO)]
        with pytest.raises(ValueError, match="outside"):
            base.write(MiB - 1, b"ab")
        with pytest.raises(ValueError, match="outside"):
            base.read(-1, 1)
    with pytest.raises(ValueError, match="closed"):
        base.read(0, 1)


@needs_qemu
def test_huge_disks(tmp_path: Path) -> None:
    path = tmp_path / "100g.qcow2"
    started = time.monotonic()
    Qcow2Image.create(path, 100 * GiB).close()
    assert time.monotonic() - started < 1
    assert path.stat().st_size <= 4 * 65536
    qemu_check(path)

    size = 2 * TiB
    path = tmp_path / "2t.qcow2"
    writes = {0: b"first", GiB - 3: b"across an L2 table", size - 70000: b"e" * 70000}
    with Qcow2Image.create(path, size) as image:
        for offset, data in writes.items():
            image.write(offset, data)
        for offset, data in writes.items():
            assert image.read(offset, len(data)) == data
        runs = image.extents()
        assert [r for r in runs if r[2] == DATA] == [
            (0, 65536, DATA),
            (GiB - 65536, 2 * 65536, DATA),
            (size - 2 * 65536, 2 * 65536, DATA),
        ]
    assert path.stat().st_size < 2 * MiB
    qemu_check(path)
    with Qcow2Image.open(path, writable=True) as image:
        image.zero(0, size)
        assert image.extents() == [(0, size, ZERO)]
    qemu_check(path)


def test_sequential_writes_map_to_long_host_runs(tmp_path: Path) -> None:
    rng = random.Random(9)
    data = rng.randbytes(48 * MiB)
    with Qcow2Image.create(tmp_path / "seq.qcow2", 64 * MiB) as image:
        for pos in range(0, len(data), MiB):
            image.write(pos, data[pos : pos + MiB])
        assert len(image.map(0, 64 * MiB)) == 1
    with Qcow2Image.create(tmp_path / "small.qcow2", 64 * MiB, cluster_size=4096) as image:
        # A table maps 2 MiB: each new table sits between two runs.
        for pos in range(0, 16 * MiB, MiB):
            image.write(pos, data[pos : pos + MiB])
        mapped = image.map(0, 64 * MiB)
        assert len(mapped) <= 9
        for v, n, host in mapped:
            assert os.pread(image.fd, n, host) == data[v : v + n]


@needs_qemu
def test_freed_clusters_are_reused_and_released(tmp_path: Path) -> None:
    path = tmp_path / "reuse.qcow2"
    data = random.Random(10).randbytes(8 * MiB)
    with Qcow2Image.create(path, 16 * MiB) as image:
        image.write(0, data)
        image.flush()
        length = path.stat().st_size
        blocks = path.stat().st_blocks
        image.zero(0, 4 * MiB)
        image.flush()
        assert path.stat().st_blocks < blocks - 4 * MiB // 512 // 2  # holes punched
        image.write(8 * MiB, data[: 4 * MiB])
        image.flush()
        assert path.stat().st_size == length  # into the freed clusters
    qemu_check(path)


@needs_qemu
def test_the_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB of file."""
    path = tmp_path / "grow.qcow2"
    data = random.Random(11).randbytes(12 * MiB)
    with Qcow2Image.create(path, 16 * MiB, cluster_size=512) as image:
        for pos in range(0, len(data), 3 * MiB):
            image.write(pos, data[pos : pos + 3 * MiB])
        image.zero(MiB, MiB)
    _, rt_clusters = struct.unpack_from(">QI", path.read_bytes(), 48)
    assert rt_clusters > 1
    expected = data[:MiB] + bytes(MiB) + data[2 * MiB :] + bytes(4 * MiB)
    qemu_check(path)
    qemu_compare(path, expected, tmp_path)
    with Qcow2Image.open(path, writable=False) as image:
        assert image.read(0, 16 * MiB) == expected


def test_concurrent_readers_and_a_writer(tmp_path: Path) -> None:
    """Methods are serialized: threads sharing a driver see whole writes."""
    import threading

    size = 4 * MiB
    with Qcow2Image.create(tmp_path / "t.qcow2", size, cluster_size=4096) as image:
        image.l2_cache_bytes = 0
        errors: list[BaseException] = []

        def writer() -> None:
            for k in range(100):
                image.write(k * 4096 * 5 % size, bytes([k % 250 + 1]) * 4096)

        def reader() -> None:
            try:
                for _ in range(100):
                    for start, n, _ in image.extents():
                        image.read(start, min(n, 8192))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer)] + [
            threading.Thread(target=reader) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


# -- damaged images ------------------------------------------------------------------------


def header_field(path: Path, offset: int, fmt: str) -> int:
    return struct.unpack_from(fmt, path.read_bytes(), offset)[0]


def patch(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, data, offset)
    os.close(fd)


def l1_entry(path: Path, index: int) -> int:
    return header_field(path, header_field(path, 40, ">Q") + 8 * index, ">Q")


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """An image with data in the first and third L2 tables (4 KiB clusters)."""
    path = tmp_path / "good.qcow2"
    with Qcow2Image.create(path, 8 * MiB, cluster_size=4096) as image:
        image.write(0, b"\x11" * 10000)
        image.write(5 * MiB, b"\x22" * 4096)
    return path


def damaged(good: Path, offset: int, data: bytes) -> Path:
    path = good.with_name("damaged.qcow2")
    shutil.copy(good, path)
    patch(path, offset, data)
    return path


def test_the_fixture_is_sound(good: Path) -> None:
    with Qcow2Image.open(good, writable=False) as image:
        assert image.read(0, 4) == b"\x11" * 4


@pytest.mark.parametrize(
    "offset, data, message",
    [
        (0, b"QFI\xfa", "bad magic"),
        (4, struct.pack(">I", 4), "unsupported version 4"),
        (20, struct.pack(">I", 30), "cluster_bits 30"),
        (32, struct.pack(">I", 1), "encrypted images are not supported"),
        (40, struct.pack(">Q", 1 << 30), "L1 table at host offset 0x40000000 is beyond the end"),
        (48, struct.pack(">Q", 1 << 30), "refcount table at host offset 0x40000000 ends beyond"),
        (48, struct.pack(">Q", 4096 * 3 + 512), "not cluster-aligned"),
        (72, struct.pack(">Q", 2), "marked corrupt"),
        (72, struct.pack(">Q", 4), "external data file"),
        (72, struct.pack(">Q", 1 << 40), "unknown incompatible features 0x10000000000"),
        (72, struct.pack(">Q", 16), "extended L2"),
    ],
)
def test_damaged_headers_are_refused(good: Path, offset: int, data: bytes, message: str) -> None:
    path = damaged(good, offset, data)
    for writable in (False, True):
        with pytest.raises(FormatError, match=message):
            Qcow2Image.open(path, writable=writable)


def test_damaged_tables_are_refused(good: Path) -> None:
    cs = 4096
    l1_offset = header_field(good, 40, ">Q")
    rt_offset = header_field(good, 48, ">Q")
    l2 = l1_entry(good, 0) & ~COPIED
    cases = [
        (l1_offset, (l2 + 512) | COPIED, "L2 table of L1 entry 0 .* not cluster-aligned"),
        (l1_offset, (1 << 40) | COPIED, "beyond the end of the file"),
        (l1_offset, rt_offset | COPIED, "refcount table and the L2 table of L1 entry 0 overlap"),
        (l1_offset + 8, l2 | COPIED, "entry 0 and the L2 table of L1 entry 1 overlap"),
        (l1_offset, l2 | COPIED | 1, "L1 entry 0 .* reserved bits"),
        (rt_offset, 12345 * cs, "refcount block 0 .* beyond the end"),
        (rt_offset + 8, l1_offset, "L1 table and refcount block 1 overlap"),
    ]  # fmt: skip
    for offset, entry, message in cases:
        path = damaged(good, offset, struct.pack(">Q", entry))
        with pytest.raises(FormatError, match=message):
            Qcow2Image.open(path, writable=False)


def test_truncated_files_are_refused(good: Path) -> None:
    for cut, message in [(0, "too short"), (50, "too short"), (1000, "first cluster")]:
        path = good.with_name("truncated.qcow2")
        path.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(FormatError, match=message):
            Qcow2Image.open(path, writable=False)


def test_damaged_l2_entries_are_refused_when_met(good: Path) -> None:
    cs = 4096
    l1_offset = header_field(good, 40, ">Q")
    l2 = l1_entry(good, 0) & ~COPIED
    for entry, message in [
        (l1_offset | COPIED, "guest offset 0x1000 points into the L1 table"),
        ((1 << 40) | COPIED, "beyond the end of the file"),
        (l2 | COPIED, "points into the L2 table of L1 entry 0"),
        ((5 * cs + 512) | COPIED, "not cluster-aligned"),
        (COPIED | (1 << 5), "reserved bits"),
        (COPIED, "maps host offset 0"),
        ((1 << 62) | (1 << 40), "compressed data beyond the end of the file"),
    ]:
        path = damaged(good, l2 + 8, struct.pack(">Q", entry))
        with Qcow2Image.open(path, writable=True) as image:
            assert image.read(8192, 100) == b"\x11" * 100  # other clusters stay readable
            for call in (
                lambda image=image: image.read(0, 8192),
                lambda image=image: image.extents(),
                lambda image=image: image.write(4096, b"x"),
                lambda image=image: image.zero(0, 8192),
            ):
                with pytest.raises(FormatError, match=message):
                    call()


def test_a_compressed_cluster_that_does_not_inflate(good: Path) -> None:
    l2 = l1_entry(good, 0) & ~COPIED
    end = good.stat().st_size
    path = damaged(good, end, zlib.compress(b"short")[2:-4])  # raw deflate, at the end
    patch(path, l2 + 16, struct.pack(">Q", (1 << 62) | end))  # guest cluster 2, one sector
    with Qcow2Image.open(path, writable=False) as image:
        assert image.extents(0, 3 * 4096) == [(0, 3 * 4096, DATA)]
        with pytest.raises(FormatError, match="decompresses to 5 bytes, not a cluster"):
            image.read(2 * 4096, 10)


def test_refcounts_are_checked_before_writing_in_place(good: Path) -> None:
    """A data cluster whose refcount is not 1 may be shared: writing it is refused."""
    l2 = l1_entry(good, 0) & ~COPIED
    host = header_field(good, l2, ">Q") & ~COPIED
    rt_offset = header_field(good, 48, ">Q")
    block = header_field(good, rt_offset, ">Q")
    path = damaged(good, block + 2 * (host // 4096), struct.pack(">H", 2))
    with Qcow2Image.open(path, writable=True) as image:
        assert image.read(0, 4) == b"\x11" * 4
        with pytest.raises(FormatError, match="refcount of 1"):
            image.write(0, b"x")


def test_metadata_the_refcounts_call_free_is_never_overwritten(good: Path) -> None:
    l1_offset = header_field(good, 40, ">Q")
    rt_offset = header_field(good, 48, ">Q")
    block = header_field(good, rt_offset, ">Q")
    path = damaged(good, block + 2 * (l1_offset // 4096), struct.pack(">H", 0))
    with Qcow2Image.open(path, writable=True) as image:
        with pytest.raises(FormatError, match="free but the L1 table is there"):
            image.write(7 * MiB, b"x" * 4096)
        assert image.read(0, 4) == b"\x11" * 4


@needs_qemu
def test_extended_l2_images_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "1M")
    with pytest.raises(FormatError, match=r"extended L2 entries .* not supported"):
        Qcow2Image.open(path, writable=False)


def test_small_calls(tmp_path: Path) -> None:
    """Empty ranges, buffers of other item sizes, the backing_reader alias."""
    from array import array

    with Qcow2Image.create(tmp_path / "s.qcow2", MiB, backing="p", backing_format="raw") as image:
        assert image.read(5, 0) == b""
        assert image.extents(5, 0) == [] and image.map(5, 0) == []
        image.write(MiB, b"")
        image.zero(0, 0)
        image.backing_reader = lambda offset, length: b"\x01" * length
        assert image.read_parent is image.backing_reader
        image.write(10, memoryview(array("I", [0x01020304] * 4)))
        written = array("I", [0x01020304] * 4).tobytes()
        assert image.read(8, 20) == b"\x01\x01" + written + b"\x01\x01"  # the rest: parent
        assert image.extents(0, 65537) == [(0, 65536, DATA), (65536, 1, PARENT)]


@pytest.mark.parametrize(
    "offset, data, message",
    [
        (72, struct.pack(">Q", 1), "dirty"),
        (96, struct.pack(">I", 5), "32-bit refcounts can only be read"),
        (60, struct.pack(">IQ", 1, 4096 * 2), "internal snapshots"),
    ],
)
def test_images_that_can_only_be_read(good: Path, offset: int, data: bytes, message: str):
    path = damaged(good, offset, data)
    with Qcow2Image.open(path, writable=False) as image:
        assert image.read(0, 10000) == b"\x11" * 10000
    with pytest.raises(FormatError, match=message):
        Qcow2Image.open(path, writable=True)


@needs_qemu
def test_autoclear_features_are_cleared_by_a_writer(good: Path) -> None:
    path = damaged(good, 88, struct.pack(">Q", 1))
    Qcow2Image.open(path, writable=False).close()
    assert header_field(path, 88, ">Q") == 1
    Qcow2Image.open(path, writable=True).close()
    assert header_field(path, 88, ">Q") == 0
    qemu_check(path)


def test_the_backing_file_is_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "child.qcow2"
    Qcow2Image.create(path, MiB, backing="missing.raw", backing_format="raw").close()
    real_open = os.open

    def guarded(name, *args, **kwargs):
        assert "missing" not in str(name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)
    with Qcow2Image.open(path, writable=True) as image:
        image.write(0, bytes(65536))
        assert image.read(0, 10) == bytes(10)
