"""`vdi-transfer vdi verify`: do a VDI's files agree with its records?

The database is the truth about chains; files can be damaged, replaced or edited by hand.
This opens every layer with its driver (which validates its structures) and compares what
the files say about themselves with what the records say: sizes, formats, and for child
layers the parent each file names.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from formats.errors import FormatError
from transfer import layers
from transfer.db import Row


def check_chain(rows: list[Row], files: list[tuple[Path, str]]) -> list[str]:
    """Problems found, as sentences (empty: all agree). Blocking: call in a thread."""
    problems: list[str] = []
    for i, (row, (path, fmt)) in enumerate(zip(rows, files, strict=True)):
        name = f"layer {i} (VDI {row['uuid']}, {path.name})"
        if not path.exists():
            problems.append(f"{name}: the file is missing")
            continue
        try:
            driver = layers.driver_class(fmt).open(path, writable=False)
        except (FormatError, OSError, ValueError) as exc:
            problems.append(f"{name}: the {fmt} file does not open: {exc}")
            continue
        try:
            if driver.virtual_size != row["virtual_size"]:
                problems.append(
                    f"{name}: the file holds {driver.virtual_size} bytes, the "
                    f"record says {row['virtual_size']}"
                )
            parent = files[i + 1] if i + 1 < len(files) else None
            problems.extend(_parent_problems(name, fmt, driver, parent, rows, i))
        finally:
            driver.close()
    return problems


def _parent_problems(name, fmt, driver, parent, rows, i) -> list[str]:
    if fmt == "qcow2":
        named = getattr(driver, "backing", None) or getattr(driver, "backing_file", None)
        expected = parent[0].name if parent else None
        if (named or None) != expected:
            return [f"{name}: the file names backing {named!r}, the records say {expected!r}"]
    if fmt == "vhd":
        named = getattr(driver, "parent", None)  # (uuid, timestamp, name) or None
        if parent is None:
            if named is not None:
                return [f"{name}: the file is a differencing disk but the record has no parent"]
        elif named is None:
            return [f"{name}: the file is not a differencing disk but the record has a parent"]
        else:
            expected = _vhd_disk_uuid(parent[0])
            if named[0] != expected:
                return [
                    f"{name}: the file names parent {uuid.UUID(bytes=named[0])}, the "
                    f"parent layer's disk is {uuid.UUID(bytes=expected)}"
                ]
    return []


def _vhd_disk_uuid(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)[68:84]
