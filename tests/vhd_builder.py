"""Hand-built VHD images for the decoder tests, written from the spec independently of
formats/vhd.py's encoder, so that layouts no writer we have makes (small blocks, partial
bitmaps, blocks before the BAT, gaps, locators) and broken images can be made to order."""

from __future__ import annotations

from dataclasses import dataclass, field

SECTOR = 512
NO_OFFSET = 0xFFFFFFFFFFFFFFFF


def checksum(raw: bytes | bytearray, at: int) -> int:
    return ~(sum(raw) - sum(raw[at : at + 4])) & 0xFFFFFFFF


def with_checksum(raw: bytes | bytearray, at: int) -> bytes:
    """`raw` with its checksum field (at byte `at`) recomputed."""
    out = bytearray(raw)
    out[at : at + 4] = checksum(out, at).to_bytes(4, "big")
    return bytes(out)


def put(raw: bytearray, at: int, size: int, value: int) -> None:
    raw[at : at + size] = value.to_bytes(size, "big")


def footer(
    current_size: int,
    disk_type: int,
    *,
    data_offset: int = SECTOR,
    uuid: bytes = b"\x11" * 16,
    timestamp: int = 700_000_000,
) -> bytes:
    raw = bytearray(512)
    raw[0:8] = b"conectix"
    put(raw, 8, 4, 2)
    put(raw, 12, 4, 0x00010000)
    put(raw, 16, 8, data_offset)
    put(raw, 24, 4, timestamp)
    raw[28:32] = b"test"
    put(raw, 32, 4, 0x00010000)
    raw[36:40] = b"Wi2k"
    put(raw, 40, 8, current_size)
    put(raw, 48, 8, current_size)
    put(raw, 56, 4, 0xFFFF10FF)
    put(raw, 60, 4, disk_type)
    raw[68:84] = uuid
    return with_checksum(raw, 64)


def dynamic_header(
    table_offset: int,
    entries: int,
    block_size: int,
    *,
    parent_uuid: bytes = bytes(16),
    parent_name: str = "",
    locators: tuple[tuple[bytes, int, int, int], ...] = (),
) -> bytes:
    """`locators`: (platform code, data space, data length, data offset) entries."""
    raw = bytearray(1024)
    raw[0:8] = b"cxsparse"
    put(raw, 8, 8, NO_OFFSET)
    put(raw, 16, 8, table_offset)
    put(raw, 24, 4, 0x00010000)
    put(raw, 28, 4, entries)
    put(raw, 32, 4, block_size)
    raw[40:56] = parent_uuid
    name = parent_name.encode("utf-16-be")
    raw[64 : 64 + len(name)] = name
    for i, (code, space, length, offset) in enumerate(locators):
        at = 576 + 24 * i
        raw[at : at + 4] = code
        put(raw, at + 4, 4, space)
        put(raw, at + 8, 4, length)
        put(raw, at + 16, 8, offset)
    return with_checksum(raw, 36)


def bitmap(sectors: set[int] | range, sectors_per_block: int) -> bytes:
    """Bit i (most significant bit of byte 0 first) set for each sector i."""
    value = 0
    for s in sectors:
        value |= 1 << (sectors_per_block - 1 - s)
    size = -(-sectors_per_block // 8 // SECTOR) * SECTOR
    return value.to_bytes(sectors_per_block // 8, "big").ljust(size, b"\0")


@dataclass
class Block:
    sectors: set[int] | range
    data: bytes  # block_size bytes, present or not


@dataclass
class DynamicImage:
    """A dynamic or differencing VHD: footer copy, header, BAT, blocks, footer, with knobs for
    every field the decoder checks."""

    current_size: int
    block_size: int = 4096
    disk_type: int = 3
    blocks: dict[int, Block] = field(default_factory=dict)
    order: list[int] | None = None  # storage order of the blocks (default: by index)
    header_offset: int = 512
    entries: int | None = None
    gap_after_bat: int = 0  # bytes (locators, batmap, ...) between BAT and first block
    gap_between_blocks: int = 0
    blocks_before_bat: bool = False  # BAT after the blocks (needs a spill)
    bat_overrides: dict[int, int] = field(default_factory=dict)  # index -> host sector
    parent_uuid: bytes = bytes(16)
    parent_name: str = ""
    locators: tuple[tuple[bytes, int, int, int], ...] = ()
    placed: dict[int, bytes] = field(default_factory=dict)  # extra bytes at given offsets
    trailing: bytes = b""  # after the end footer

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // SECTOR

    @property
    def bitmap_size(self) -> int:
        return -(-self.sectors_per_block // 8 // SECTOR) * SECTOR

    def expected(self, fill: int = 0) -> bytearray:
        """The disk after applying this image to one full of `fill` bytes."""
        size = -(-self.current_size // SECTOR) * SECTOR
        disk = bytearray([fill]) * size
        for index, block in self.blocks.items():
            for s in block.sectors:
                at = index * self.block_size + s * SECTOR
                if at < size:
                    disk[at : at + SECTOR] = block.data[s * SECTOR : (s + 1) * SECTOR]
        return disk

    def render(self) -> bytes:
        bs = self.block_size
        entries = self.entries if self.entries is not None else -(-self.current_size // bs)
        bat_size = -(-4 * entries // SECTOR) * SECTOR
        stride = self.bitmap_size + bs
        order = self.order if self.order is not None else sorted(self.blocks)
        out = bytearray()
        header_end = self.header_offset + 1024
        if self.blocks_before_bat:
            blocks_at = -(-header_end // SECTOR) * SECTOR
            table_offset = blocks_at + len(order) * (stride + self.gap_between_blocks)
            end = table_offset + bat_size
        else:
            table_offset = max(1536, -(-header_end // SECTOR) * SECTOR)
            blocks_at = table_offset + bat_size + self.gap_after_bat
            end = blocks_at + len(order) * (stride + self.gap_between_blocks)
        bat = [0xFFFFFFFF] * entries
        out = bytearray(end)
        at = blocks_at
        for index in order:
            block = self.blocks[index]
            out[at : at + stride] = bitmap(block.sectors, self.sectors_per_block) + block.data
            bat[index] = at // SECTOR
            at += stride + self.gap_between_blocks
        for index, sector in self.bat_overrides.items():
            bat[index] = sector
        out[table_offset : table_offset + 4 * entries] = b"".join(s.to_bytes(4, "big") for s in bat)
        foot = footer(self.current_size, self.disk_type, data_offset=self.header_offset)
        out[0:512] = foot
        out[self.header_offset : header_end] = dynamic_header(
            table_offset,
            entries,
            bs,
            parent_uuid=self.parent_uuid,
            parent_name=self.parent_name,
            locators=self.locators,
        )
        for offset, data in self.placed.items():
            out[offset : offset + len(data)] = data
        return bytes(out) + foot + self.trailing
