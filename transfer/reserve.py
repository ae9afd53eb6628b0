"""Space kept back for the state database, so that a full disk never wedges a VDI.

With the state dir and an SR on one filesystem, an import that fills the SR leaves SQLite
unable to commit ("database or disk is full"), and the task would stay pending with its VDI
locked. A few MiB are allocated at start (`space-reserve` in the state dir); when an import
finds its SR full, the reserve is given up first if it shares the SR's filesystem, so the
task's failure and the VDI's release can be written. It is taken again once the space is
back (at the next start or housekeeping round).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

RESERVE = 16 << 20
NAME = "space-reserve"


def is_full(exc: BaseException) -> bool:
    """The error is a filesystem out of space (or of the user's quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def take(state_dir: Path) -> bool:
    """Blocking. Allocate the reserve if it is missing; False if there is no room for it."""
    path = state_dir / NAME
    try:
        if path.stat().st_size >= RESERVE:
            return True
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if not is_full(exc) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        path.unlink(missing_ok=True)
        return False
    return True


def give_up(state_dir: Path, near: Path) -> bool:
    """Blocking. Release the reserve if it is on the same filesystem as `near` (a full
    SR's directory): True if space was freed there."""
    path = state_dir / NAME
    try:
        if path.stat().st_dev != near.stat().st_dev:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True
