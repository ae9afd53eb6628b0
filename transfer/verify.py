"""`vdi-transfer vdi verify`: do a VDI's files agree with its records?

The database is the truth about chains; files can be damaged, replaced or edited by hand.
This opens every layer with its driver (which validates its structures) and compares what
the files say about themselves with what the records say: sizes, formats, and for child
layers the parent each file names.
"""

from __future__ import annotations

from pathlib import Path

from formats.errors import FormatError
from formats.registry import FORMATS
from transfer.db import Row


def check_chain(rows: list[Row], files: list[tuple[Path, str]]) -> list[str]:
    """Problems found, as sentences (empty: all agree). Blocking: call in a thread."""
    problems: list[str] = []
    for i, (row, (path, fmt)) in enumerate(zip(rows, files, strict=True)):
        name = f"layer {i} (VDI {row['uuid']}, {path.name})"
        if row.get("data_destroyed") and row.get("cbt_enabled"):
            # cbt_metadata: what must be there is its change log (until it is deleted and
            # hidden: then its log lives on merged into the next version's); its data may be
            # gone.
            if not row.get("hidden") and not (path.parent / f"{row['uuid']}.cbt").exists():
                problems.append(f"{name}: cbt_metadata, but its change log is missing")
            if not path.exists():
                continue
        if not path.exists():
            problems.append(f"{name}: the file is missing")
            continue
        kind = FORMATS[fmt]
        try:
            driver = kind.driver.open(path, writable=False)
        except (FormatError, OSError, ValueError) as exc:
            problems.append(f"{name}: the {fmt} file does not open: {exc}")
            continue
        try:
            if driver.virtual_size != row["virtual_size"]:
                problems.append(
                    f"{name}: the file holds {driver.virtual_size} bytes, the "
                    f"record says {row['virtual_size']}"
                )
            parent = files[i + 1][0] if i + 1 < len(files) else None
            if kind.parent_mismatch is not None:
                try:
                    mismatch = kind.parent_mismatch(driver, parent)
                except (FormatError, OSError) as exc:
                    mismatch = f"the parent layer's file does not say who it is: {exc}"
                if mismatch:
                    problems.append(f"{name}: {mismatch}")
        finally:
            driver.close()
    return problems
