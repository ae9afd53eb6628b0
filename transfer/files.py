"""Files of SRs and of the state dir: removal, durable directories, allocation, filesystem
size. Blocking calls: run them, and any other disk work, through `in_thread`, so the event
loop never waits on the disk."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking call in a worker thread, so the event loop does not wait on it."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable: what was created, renamed or removed in it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_sr_dir(path: Path) -> None:
    """An SR's directory, created if missing (0750: no access for other users)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o750)


def remove(path: Path) -> None:
    """Unlink a file durably (its directory is synced); a missing file is no error."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies on disk (holes do not count); 0 if it is missing."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def filesystem_size(path: Path) -> tuple[int, int]:
    """(total, used) bytes of the filesystem holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0, 0
        raise
    total = st.f_blocks * st.f_frsize
    return total, total - st.f_bfree * st.f_frsize
