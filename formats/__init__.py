"""Disk image codecs and drivers (raw, XAPI chunk framing, VHD, QCOW2, XAPI tar, OVA):
pure Python, sans-I/O where it can be, no aiohttp, no asyncio.

Decoders (formats.events.Decoder) are fed bytes and return Header/Write/Zero events;
encoders compute an output layout (formats.layout) from an allocation map; image drivers
(formats.driver) read and write one layer of a VDI, which formats.chain stacks.
formats.registry describes each format once: what decodes it, stores it and encodes it.
"""
