"""Disk image codecs and drivers (raw, VHD, QCOW2, tar): pure Python, sans-I/O where it can be.

Decoders take bytes and emit (offset, data) and zero ranges; encoders compute a layout from an
allocation map and a reader. No aiohttp, no asyncio here.
"""
