"""A checksum of a VDI's content that does not depend on how the VDI is stored: its runtime
format, its chain of layers, or which of its zeros are holes. A backup tool compares it with
a hash of what it restored, without downloading the disk again.

The construction is ovirt-imageio's block hash (nirs/blkhash's first, single-stream form):
the disk is cut into `block_size` blocks, the last one possibly shorter; each block is hashed
on its own; the checksum is the hash of the concatenated block digests. A block that is a
hole in every layer is not read: its digest is the digest of that many zero bytes, computed
once. blake2b digests are 32 bytes long; sha256 has its own 32.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable
from typing import Any

from common.errors import bad_request
from formats.chain import Chain
from formats.driver import DATA
from transfer import layers
from transfer.files import in_thread
from transfer.services import Services
from transfer.sizes import parse_size

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_BLOCK_SIZE = 4 * MiB
MIN_BLOCK_SIZE = 4 * KiB
MAX_BLOCK_SIZE = 64 * MiB  # one block is held in memory while it is hashed

HASHES: dict[str, Callable[..., Any]] = {
    "sha256": hashlib.sha256,
    "blake2b": functools.partial(hashlib.blake2b, digest_size=32),
}


def parse_request(algorithm: str | None, block_size: str | None) -> tuple[str, int]:
    """The algorithm (blake2b by default, as ovirt-imageio) and block size (4 MiB)."""
    name = (algorithm or "blake2b").lower()
    if name not in HASHES:
        raise bad_request(f"algorithm must be one of {', '.join(HASHES)}, not {algorithm}")
    size = DEFAULT_BLOCK_SIZE if block_size is None else parse_size(block_size, "block_size")
    if size % MIN_BLOCK_SIZE or not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
        raise bad_request(
            f"block_size must be a multiple of 4 KiB from 4 KiB to 64 MiB, not {block_size}"
        )
    return name, size


def block_checksum(chain: Chain, size: int, algorithm: str, block_size: int) -> str:
    """Blocking: the checksum of the first `size` bytes the chain reads as."""
    new = HASHES[algorithm]
    outer = new()
    zero_block = new(bytes(block_size)).digest()
    data = [(start, start + n) for start, n, kind in chain.extents() if kind == DATA]
    run = 0
    for start in range(0, size, block_size):
        end = min(start + block_size, size)
        while run < len(data) and data[run][1] <= start:
            run += 1
        holds_data = run < len(data) and data[run][0] < end
        if holds_data:
            outer.update(new(chain.read(start, end - start)).digest())
        elif end - start == block_size:
            outer.update(zero_block)
        else:
            outer.update(new(bytes(end - start)).digest())
    return outer.hexdigest()


async def checksum(svc: Services, vdi_uuid: str, algorithm: str, block_size: int) -> dict:
    """{algorithm, block_size, checksum} of the VDI, under a read lease (no writer starts
    while it is read)."""
    lease = await svc.vdis.add_reader(vdi_uuid)
    try:
        vdi = await svc.vdis.get(vdi_uuid)
        svc.vdis.check_not_written(vdi)
        svc.vdis.check_has_data(vdi)
        files = await svc.vdis.chain_files(vdi)
        chain = await in_thread(functools.partial(layers.open_chain, files, writable=False))
        try:
            value = await in_thread(
                block_checksum, chain, vdi["virtual_size"], algorithm, block_size
            )
        finally:
            await asyncio.shield(in_thread(layers.close_chain, chain))
    finally:
        await asyncio.shield(svc.vdis.drop_reader(lease))
    return {"algorithm": algorithm, "block_size": block_size, "checksum": value}
