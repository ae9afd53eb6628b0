"""What changed between a VDI and an older snapshot (`base=`): the runs an incremental export
must carry, as (start, length, kind) with kind DATA or ZERO (what the VDI reads there now).

VHD/QCOW2 VDIs answer from their chains, without reading data: the layers above the base
(or, when base and VDI sit on different branches, above their common ancestor on both
sides) say which ranges may differ. Raw VDIs have no chain: they are compared block by
block, which reads both disks' data extents (O(allocated size)). A base whose data was
destroyed has only its change log: the blocks changed block tracking lists are sent.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import bad_request
from formats.chain import Chain, coalesce, union_spans
from formats.driver import DATA, ZERO
from formats.registry import FORMATS
from transfer import cbt, layers
from transfer.db import Row
from transfer.files import in_thread
from transfer.services import Services

COMPARE_BLOCK = 1 << 20


async def changed_runs(
    svc: Services, vdi: Row, base: Row, chain: Chain | None = None
) -> list[tuple[int, int, str]]:
    """`chain`: the VDI's chain if the caller has it open already (it stays open)."""
    if base["virtual_size"] != vdi["virtual_size"]:
        raise bad_request(
            f"base {base['uuid']} has {base['virtual_size']} bytes and VDI {vdi['uuid']} "
            f"{vdi['virtual_size']}: not versions of one disk"
        )
    vdi_rows = await svc.vdis.chain_rows(vdi)
    vdi_files = [(await svc.vdis.path(r), r["image_format"]) for r in vdi_rows]
    if base["data_destroyed"]:  # only its change log is left: the blocks it lists
        bitmap = await svc.vdis.changed_blocks(vdi, base)
        return await in_thread(_over, vdi_files, cbt.spans(bitmap, vdi["virtual_size"]), chain)
    base_rows = await svc.vdis.chain_rows(base)
    base_files = [(await svc.vdis.path(r), r["image_format"]) for r in base_rows]
    if not (FORMATS[vdi["image_format"]].layered and FORMATS[base["image_format"]].layered):
        return await in_thread(_compare, vdi_files, base_files, chain)
    vdi_ids = [r["uuid"] for r in vdi_rows]
    base_ids = [r["uuid"] for r in base_rows]
    common = next((u for u in vdi_ids if u in base_ids), None)
    if common is None:
        raise bad_request(
            f"VDI {vdi['uuid']} and base {base['uuid']} share no layer: the base must be an "
            "older snapshot of the same disk (or of a disk it was cloned from)"
        )
    return await in_thread(
        _from_chains, vdi_files, vdi_ids.index(common), base_files, base_ids.index(common)
    )


def _over(
    vdi_files: list[tuple[Path, str]], spans: list[tuple[int, int]], opened: Chain | None
) -> list[tuple[int, int, str]]:
    """What the VDI reads over `spans` (the blocks change tracking lists)."""
    vdi_chain = opened or layers.open_chain(vdi_files, writable=False)
    try:
        return vdi_chain.reads_over(spans)
    finally:
        if opened is None:
            layers.close_chain(vdi_chain)


def _from_chains(
    vdi_files: list[tuple[Path, str]],
    vdi_depth: int,
    base_files: list[tuple[Path, str]],
    base_depth: int,
    opened: Chain | None = None,
) -> list[tuple[int, int, str]]:
    vdi_chain = opened or layers.open_chain(vdi_files, writable=False)
    base_chain = layers.open_chain(base_files, writable=False) if base_depth else None
    try:
        # What either branch changed since their common layer, as the VDI reads it now.
        spans = vdi_chain.touched(vdi_depth)
        if base_chain is not None:
            spans += base_chain.touched(base_depth)
        return vdi_chain.reads_over(spans)
    finally:
        if opened is None:
            layers.close_chain(vdi_chain)
        if base_chain is not None:
            layers.close_chain(base_chain)


def _compare(
    vdi_files: list[tuple[Path, str]],
    base_files: list[tuple[Path, str]],
    opened: Chain | None = None,
) -> list[tuple[int, int, str]]:
    vdi_chain = opened or layers.open_chain(vdi_files, writable=False)
    base_chain = layers.open_chain(base_files, writable=False)
    try:
        return coalesce(list(_differing_blocks(vdi_chain, base_chain)))
    finally:
        if opened is None:
            layers.close_chain(vdi_chain)
        layers.close_chain(base_chain)


def _differing_blocks(vdi: Chain, base: Chain):
    """Blocks where the two disks differ, reading only where either holds data."""
    spans = [(s, n) for s, n, k in vdi.extents() + base.extents() if k == DATA]
    for start, n in union_spans(spans):
        pos, end = start, start + n
        while pos < end:
            size = min(COMPARE_BLOCK - pos % COMPARE_BLOCK, end - pos)
            ours = vdi.read(pos, size)
            if ours != base.read(pos, size):
                yield pos, size, (DATA if ours.count(0) != size else ZERO)
            pos += size
