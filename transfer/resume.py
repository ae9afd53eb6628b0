"""Checkpoints of resumable uploads: the decoder's state at a durable stream offset.

Decoders are plain Python objects, so their state is pickled (written and read only by this
server, never taken from a client) into `<state dir>/uploads/<task>.state`, atomically
(temporary file, fsync, rename) and only after the data up to that offset is durable. A
decoder that cannot be pickled at some moment (it holds a view into fed bytes) is simply not
checkpointed then; the next checkpoint catches up.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer.storage import fsync_dir

CHECKPOINT_BYTES = 64 << 20  # Upload-Offset advances at least every 64 MiB ...
CHECKPOINT_SECONDS = 1.0  # ... or every second while data flows


@dataclass
class Checkpoint:
    offset: int  # stream bytes durable
    decoder: Any  # its state after those bytes
    punch: bool = True  # image imports: whether zeros overwrite (a delta) or were cleared


def state_path(state_dir: Path, task: str) -> Path:
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
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None


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
        (sr / f".spill-{task}").unlink(missing_ok=True)
