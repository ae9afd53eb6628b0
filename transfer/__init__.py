"""vdi-transfer: move virtual disks in and out of storage over HTTP."""

__version__ = "0.1.0"
