"""Importing disk images (VHD, QCOW2, XAPI tar, OVA): a decoder in a worker thread turns the
body into Header/Write/Zero events, applied to the VDI file in the same thread.

The pipeline has two stages: while a worker decodes and writes one ~8 MiB batch of the
body, the event loop gathers the next. The one event that needs the loop is `Header`: it
may create the VDI (`sr=`), must check the declared size before anything is written, and
clears the target of a whole image; the worker hands it back with the events after it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from formats.chain import Chain
from formats.errors import OutOfBounds
from formats.events import Event, Header, Write, Zero
from transfer import layers
from transfer.diskio import write_batch, zero_and_data_runs, zero_range

BATCH = 8 << 20


class FdTarget:
    """A raw VDI file: written directly, zeros skipped or punched."""

    def __init__(self, fd: int):
        self.fd = fd

    def write_run(self, start: int, parts: list, punch: bool) -> int:
        return write_batch(self.fd, start, parts, punch).data

    def zero(self, offset: int, length: int) -> None:
        zero_range(self.fd, offset, length)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class ChainTarget:
    """A VHD/QCOW2 VDI: written through the driver of its chain's top layer, which
    allocates blocks/clusters; zero runs are zeroed there (masking the layers below)."""

    def __init__(self, chain: Chain):
        self.chain = chain

    def write_run(self, start: int, parts: list, punch: bool) -> int:
        written = 0
        for kind, at, item in zero_and_data_runs(start, parts):
            if kind == "data":
                data = item[0] if len(item) == 1 else b"".join(item)
                self.chain.top.write(at, data)
                written += len(data)
            elif punch:
                self.chain.top.zero(at, item)
        return written

    def zero(self, offset: int, length: int) -> None:
        self.chain.top.zero(offset, length)

    def flush(self) -> None:
        self.chain.top.flush()

    def close(self) -> None:
        layers.close_chain(self.chain)


@dataclass
class Sink:
    """Where events land: the VDI's target, its size, and whether zeros must be written
    (a delta overwrites; a whole image was cleared first, so zeros are skipped)."""

    target: FdTarget | ChainTarget | None = None
    size: int = 0
    punch: bool = True
    written: int = 0
    reached: int = 0  # highest disk offset written so far (for progress estimates)


def events_of(decoder, chunks: list, final: bool) -> Iterator[Event]:
    """The events of `chunks` (and of the stream's end if `final`), produced lazily: a
    decoder may hand out spilled or decompressed data only as it is consumed, so nothing
    here may collect them into a list."""
    for chunk in chunks:
        yield from decoder.feed(chunk)
    if final:
        yield from decoder.finish()


def apply(events: Iterator[Event], sink: Sink) -> Iterator[Event] | None:
    """Worker thread: apply events in order as they are produced. At a Header, stop and
    return the iterator positioned on it, for the loop to handle and then resume."""
    run: list = []  # contiguous writes gathered into one batch
    run_start = run_end = 0
    for ev in events:
        if isinstance(ev, Header):
            _flush(sink, run, run_start, run_end)
            return itertools.chain((ev,), events)
        if sink.target is None:
            raise RuntimeError("the decoder wrote before its Header")
        if isinstance(ev, Write):
            end = ev.offset + len(ev.data)
            _check_bounds(ev.offset, end, sink.size)
            if run and ev.offset == run_end and run_end - run_start < BATCH:
                run.append(ev.data)
                run_end = end
                continue
            _flush(sink, run, run_start, run_end)
            run, run_start, run_end = [ev.data], ev.offset, end
        elif isinstance(ev, Zero):
            _flush(sink, run, run_start, run_end)
            _check_bounds(ev.offset, ev.offset + ev.length, sink.size)
            if ev.length:
                sink.target.zero(ev.offset, ev.length)
                sink.reached = max(sink.reached, ev.offset + ev.length)
    _flush(sink, run, run_start, run_end)
    return None


def _flush(sink: Sink, run: list, start: int, end: int) -> None:
    if run and end > start:
        sink.written += sink.target.write_run(start, run, sink.punch)
        sink.reached = max(sink.reached, end)
    run.clear()


def _check_bounds(start: int, end: int, size: int) -> None:
    if end > size:
        raise OutOfBounds(
            f"the image writes bytes {start}-{end - 1}, beyond the disk's {size} bytes",
            end,
            size,
        )


async def run_pipeline(
    decoder,
    body,
    sink: Sink,
    on_header: Callable[[Header], Awaitable[None]],
    on_progress: Callable[[int, Sink], Awaitable[None]],
    on_batch: Callable[..., Awaitable[None]] | None = None,
    final: bool = True,
) -> int:
    """Feed the body through the decoder into the sink; returns the body bytes read.
    `on_batch(n)`: the first n body bytes are applied (a checkpoint may be taken).
    `final`: the body ends the stream (False for a segment of a resumable upload)."""
    loop = asyncio.get_running_loop()
    received = 0
    pending: asyncio.Future | None = None

    async def settle(future: asyncio.Future) -> None:
        held = await future
        while held is not None:
            header = next(held)
            assert isinstance(header, Header)
            await on_header(header)
            held = await loop.run_in_executor(None, apply, held, sink)

    try:
        eof = False
        while not eof:
            batch, size = [], 0
            while size < BATCH:
                try:
                    chunk = await body.readany()
                except BaseException:
                    # The body broke off: what was fed so far is applied and, for a
                    # resumable upload, checkpointed before the error goes up.
                    if pending is not None:
                        future, pending = pending, None
                        await settle(future)
                        if on_batch is not None:
                            await on_batch(received, True)
                    raise
                if not chunk:
                    eof = True
                    break
                batch.append(chunk)
                size += len(chunk)
            if pending is not None:
                await settle(pending)
                pending = None
                if on_batch is not None:
                    await on_batch(received)
            received += size
            await on_progress(received, sink)
            pending = loop.run_in_executor(
                None, apply, events_of(decoder, batch, eof and final), sink
            )
        await settle(pending)
        pending = None
        if on_batch is not None:
            await on_batch(received)
    finally:
        if pending is not None:  # the worker may still be writing: the fd must outlive it
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()
    return received
