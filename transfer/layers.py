"""Opening a VDI's files as image drivers, and the file operations of snapshots.

Blocking functions: the service calls them from worker threads. Which files make up a VDI,
and in what order, comes from the database (`VdiService.chain_rows`), never from names
inside the files.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from formats.chain import Chain
from formats.driver import DATA
from formats.raw_image import RawImage
from formats.registry import FORMATS, Identity
from transfer import files

FICLONE = 0x40049409


def open_chain(layers: list[tuple[Path, str]], *, writable: bool) -> Chain:
    """Open (path, format) layers, top first; only the top may be writable."""
    opened = []
    try:
        for i, (path, fmt) in enumerate(layers):
            opened.append(FORMATS[fmt].driver.open(path, writable=writable and i == 0))
    except BaseException:
        for driver in opened:
            driver.close()
        raise
    chain = Chain(opened)
    if len(opened) > 1:  # what a partial write of the top must copy up
        chain.top.read_parent = lambda offset, length: chain.read(offset, length, first=1)
    return chain


def close_chain(chain: Chain) -> None:
    """Close every layer of a chain open_chain opened."""
    for driver in chain.layers:
        driver.close()


def create_image(
    path: Path, fmt: str, size: int, identity: Identity, parent: Path | None = None
) -> None:
    """A new empty image file of the VDI `identity`; with `parent` (that layer's file, same
    format) a child layer. Durable when this returns; nothing is left behind on failure."""
    image = FORMATS[fmt].create(path, size, identity, parent)
    try:
        image.flush()
    except BaseException:
        image.close()
        path.unlink(missing_ok=True)
        raise
    image.close()
    files.fsync_dir(path.parent)


def copy_sparse(source: Path, target: Path) -> str:
    """A full copy of a raw file: a reflink where the filesystem shares extents (O(1)),
    else copy_file_range of the data extents only, so holes stay holes. Returns how."""
    src = RawImage.open(source, writable=False)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        try:
            fcntl.ioctl(fd, FICLONE, src.fd)
            how = "reflink"
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise
            how = "copy_file_range"
        if how == "copy_file_range":
            _copy_data_extents(src, fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    os.close(fd)
    files.fsync_dir(target.parent)
    return how


def _copy_data_extents(src: RawImage, fd: int) -> None:
    os.ftruncate(fd, src.virtual_size)
    for start, length, kind in src.extents():
        if kind != DATA:
            continue
        pos, end = start, start + length
        while pos < end:
            n = os.copy_file_range(src.fd, fd, end - pos, pos, pos)
            if n == 0:
                raise OSError(f"the copy of {src.path} stopped at byte {pos}")
            pos += n
