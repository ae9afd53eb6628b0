"""Linux file calls the os module lacks: fallocate(PUNCH_HOLE) and sync_file_range.

Both release the GIL (ctypes drops it around foreign calls) and are called from worker
threads. Where the kernel or filesystem refuses, callers fall back (writing zeros, or
skipping early writeback), so correctness never depends on them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SYNC_FILE_RANGE_WAIT_BEFORE = 0x1
SYNC_FILE_RANGE_WRITE = 0x2
SYNC_FILE_RANGE_WAIT_AFTER = 0x4

try:
    _fallocate = _libc.fallocate64
except AttributeError:  # pragma: no cover - every glibc has it
    _fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length): it reads as zeros afterwards. False if the
    filesystem cannot punch holes (the caller then writes zeros instead)."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing dirty pages of a range to disk without waiting, so the final fsync
    has little left to do. Best effort."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def finish_writeback(fd: int, offset: int, length: int) -> None:
    """Wait until the range's dirty pages are on their way to disk and written (not a
    durability barrier: the disk's cache and the metadata need fsync). Best effort."""
    if _sync_file_range is not None:
        flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
        _sync_file_range(fd, offset, length, flags)


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the range's clean pages from the page cache (a hint: what is dirty stays)."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class Writeback:
    """Keeps few of a file's pages dirty or cached while it is written in runs: writeback
    of each run starts at once, and the run before it is waited for and dropped from the
    cache. Unbounded, dirty pages pile up until the kernel throttles the writer, and every
    page is a newly allocated one to copy into."""

    def __init__(self, fd: int):
        self.fd = fd
        self._last: tuple[int, int] | None = None  # the run whose writeback may still run

    def written(self, offset: int, length: int) -> None:
        """A run was written: at most its pages stay dirty or cached."""
        start_writeback(self.fd, offset, length)
        previous, self._last = self._last, (offset, length)
        if previous is not None:
            finish_writeback(self.fd, *previous)
            drop_cached(self.fd, *previous)
