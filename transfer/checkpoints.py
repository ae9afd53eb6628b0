"""What an upload keeps on disk between connections: the decoder's state at a durable
stream offset (its checkpoint), and the spill file where a decoder parks bytes whose meaning
comes later.

Decoders are plain Python objects, so their state is pickled (written and read only by this
server, never taken from a client) into `<state dir>/uploads/<task>.state`, atomically
(temporary file, fsync, rename) and only after the data up to that offset is durable. A
decoder that cannot be pickled at some moment (it holds a view into fed bytes) is simply not
checkpointed then; the next checkpoint catches up. Its spill file, `<SR>/.spill-<task>`, is
pickled by name and reopened.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats import linux
from transfer.files import fsync_dir

CHECKPOINT_BYTES = 64 << 20  # Upload-Offset advances at least every 64 MiB ...
CHECKPOINT_SECONDS = 1.0  # ... or every second while data flows
STALL_CHECKPOINT = 1.0  # and within this long of the last one when the data stops


@dataclass
class Checkpoint:
    """An upload's state at a durable stream offset: enough to go on from there."""

    offset: int  # stream bytes durable
    decoder: Any  # its state after those bytes
    punch: bool = True  # whether zeros are written (a delta) or the disk reads zero there
    spill: Any = None  # the decoder's SpillFile, if it has one (pickled with it, by name)


class Schedule:
    """When a resumable upload is due a checkpoint: every CHECKPOINT_BYTES or
    CHECKPOINT_SECONDS of data."""

    def __init__(self, enabled: bool, start: int):
        self.enabled = enabled
        self.last_offset = start
        self.last_time = time.monotonic()

    def due(self, offset: int) -> bool:
        return self.enabled and (
            offset - self.last_offset >= CHECKPOINT_BYTES
            or time.monotonic() - self.last_time >= CHECKPOINT_SECONDS
        )

    def done(self, offset: int) -> None:
        self.last_offset, self.last_time = offset, time.monotonic()


def state_path(state_dir: Path, task: str) -> Path:
    """Where the checkpoint of an upload's task is kept, on the host that runs it."""
    return state_dir / "uploads" / f"{task}.state"


def save(path: Path, checkpoint: Checkpoint) -> bool:
    """Blocking. False if the decoder cannot be pickled right now."""
    try:
        data = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
    except (TypeError, pickle.PicklingError, AttributeError):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
    return True


def load(path: Path) -> Checkpoint | None:
    """Blocking. None if there is none, or none this version of the server can read."""
    try:
        with open(path, "rb") as f:
            checkpoint = pickle.load(f)
    except FileNotFoundError:
        return None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None  # written by a version whose classes were different
    return checkpoint if isinstance(checkpoint, Checkpoint) else None


def saved_tasks(state_dir: Path) -> list[str]:
    """Blocking: the tasks that have a checkpoint on this host."""
    try:
        return [p.stem for p in (state_dir / "uploads").glob("*.state")]
    except FileNotFoundError:
        return []


def discard(state_dir: Path, task: str, sr_paths: list[Path]) -> None:
    """Blocking: remove an upload's checkpoint and spill files (it finished or expired)."""
    state_path(state_dir, task).unlink(missing_ok=True)
    for sr in sr_paths:
        spill_path(sr, task).unlink(missing_ok=True)


def spill_path(sr: Path, task: str) -> Path:
    """Where an upload's decoder parks bytes: in the SR its VDI is on (bounded by the upload,
    which the SR has room for anyway)."""
    return sr / f".spill-{task}"


class SpillFile:
    """formats.spill.Spill over a sparse file in the SR. Blocking calls: used from the
    decoder's worker thread. Bounded by the upload's size: it holds only bytes that
    arrived."""

    def __init__(self, sr: Path, task: str):
        self.path = spill_path(sr, task)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def __getstate__(self) -> dict:
        """A checkpointed decoder refers to its spill by path."""
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def sync(self) -> None:
        os.fsync(self.fd)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def discard(self, offset: int, length: int) -> None:
        linux.punch_hole(self.fd, offset, length)

    def close(self, remove: bool = True) -> None:
        """Close; remove the file unless a suspended upload will need it again."""
        os.close(self.fd)
        if remove:
            self.path.unlink(missing_ok=True)
