"""The import pipeline, the one way every upload reaches a VDI: body bytes -> the format's
decoder -> Header/Write/Zero events -> the target, in order.

Two stages overlap: while a worker thread decodes and applies one batch of the body (about
BATCH bytes), the event loop gathers the next. A batch goes to the worker when it is full,
or sooner when the body pauses (IDLE) or trickles (AGE): a slow client's data reaches the
disk, its task's progress and its resumable upload's checkpoints within about a second.
The one event that needs the loop is `Header`: it may create the VDI (`sr=`), must check
the declared size before anything is written, and clears the target of a whole image; the
worker hands it back with the events after it.

The worker writes contiguous data in runs cut at ZERO_BLOCK-aligned disk offsets, carrying
the unaligned tail into the next run: a zero block split between two runs would be tested
(and punched) in halves, leaving the page under the cut allocated.

All uploads share one `Budget` of body bytes held in memory (gathered or being applied):
when it is spent, a pipeline hands over what it gathered and reads no more until bytes come
back, so the client waits (TCP flow control) rather than the server growing.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from formats.errors import OutOfBounds
from formats.events import Decoder, Event, Header, Write, Zero
from transfer.targets import ZERO_BLOCK, Parts, Target

BATCH = 8 << 20  # body bytes per worker job, and the longest run written at once
IDLE = 0.1  # seconds the body may pause before what was gathered goes to the worker
AGE = 0.5  # seconds a gathered byte may wait for its batch to fill


class Body(Protocol):
    """A request body as the pipeline reads it (aiohttp's StreamReader is one)."""

    async def readany(self) -> bytes:
        """The next bytes; b"" at the end."""


class Budget:
    """Bytes of upload bodies all pipelines together may hold in memory. Used on the event
    loop only. A pipeline takes what it reads and gives it back once it is applied; while the
    budget is spent, pipelines that hold nothing wait for room (first come, first served),
    and those that hold bytes hand them over to be applied instead of waiting with them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n
        while self._waiting and not self.spent:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def room(self) -> None:
        """Wait until the budget is not spent."""
        while self.spent:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and not self.spent:
                    self.give(0)  # the wake-up was for us: pass it on
                raise


class Applier:
    """Applies events to the target, in a worker thread (one call at a time)."""

    def __init__(self) -> None:
        self.target: Target | None = None  # set at the Header
        self.size = 0  # the disk's size: writes beyond it are OutOfBounds
        self.punch = True  # zeros must be written (a delta, or a disk that may hold data)
        self.written = 0  # data bytes written
        self.reached = 0  # highest disk offset applied (for progress estimates)
        self._run: Parts = []  # contiguous data not written yet
        self._start = self._end = 0

    def apply(self, events: Iterator[Event]) -> Iterator[Event] | None:
        """Apply events in order as they are produced. At a Header, stop and return the
        iterator positioned on it, for the loop to handle and then resume."""
        for ev in events:
            if isinstance(ev, Header):
                self.flush()
                return itertools.chain((ev,), events)
            if self.target is None:
                raise RuntimeError("the decoder wrote before its Header")
            if isinstance(ev, Write):
                end = ev.offset + len(ev.data)
                self._check_bounds(ev.offset, end)
                if self._run and ev.offset == self._end:
                    self._run.append(ev.data)
                    self._end = end
                    if end - self._start >= BATCH:
                        self._write(aligned=True)
                    continue
                self.flush()
                self._run, self._start, self._end = [ev.data], ev.offset, end
            elif isinstance(ev, Zero):
                self.flush()
                self._check_bounds(ev.offset, ev.offset + ev.length)
                if ev.length:
                    self.target.zero(ev.offset, ev.length)
                    self.reached = max(self.reached, ev.offset + ev.length)
        self._write(aligned=True)
        return None

    def flush(self) -> None:
        """Write the data held back at the end of the last run."""
        self._write(aligned=False)

    def _write(self, aligned: bool) -> None:
        """Write the run; if `aligned`, only up to its last ZERO_BLOCK boundary."""
        if not self._run:
            return
        cut = self._end - self._end % ZERO_BLOCK if aligned else self._end
        if cut <= self._start:
            return
        parts, carry = _split(self._run, cut - self._start)
        assert self.target is not None
        self.written += self.target.write_run(self._start, parts, self.punch)
        self.reached = max(self.reached, cut)
        self._run, self._start = carry, cut

    def _check_bounds(self, start: int, end: int) -> None:
        if end > self.size:
            raise OutOfBounds(
                f"the image writes bytes {start}-{end - 1}, beyond the disk's {self.size} bytes",
                end,
                self.size,
            )


def _split(parts: Parts, n: int) -> tuple[Parts, Parts]:
    """The first `n` bytes of `parts`, and the rest (views, no copies)."""
    head: Parts = []
    for i, part in enumerate(parts):
        if n >= len(part):
            head.append(part)
            n -= len(part)
            continue
        if n:
            view = memoryview(part)
            return [*head, view[:n]], [view[n:], *parts[i + 1 :]]
        return head, parts[i:]
    return head, []


def events_of(decoder: Decoder, chunks: list, final: bool) -> Iterator[Event]:
    """The events of `chunks` (and of the stream's end if `final`), produced lazily: a
    decoder may hand out spilled or decompressed data only as it is consumed, so nothing
    here may collect them into a list."""
    for chunk in chunks:
        yield from decoder.feed(chunk)
    if final:
        yield from decoder.finish()


async def run(
    decoder: Decoder,
    body: Body,
    applier: Applier,
    on_header: Callable[[Header], Awaitable[None]],
    on_received: Callable[[int], Awaitable[None]],
    on_applied: Callable[[int, bool], Awaitable[None]],
    budget: Budget,
    final: bool = True,
    on_idle: Callable[[int], Awaitable[bool]] | None = None,
) -> int:
    """Feed the body through the decoder into the applier's target; returns the body bytes
    read. `on_received(n)`: n body bytes have arrived. `on_applied(n, broke)`: the first n
    are decoded and applied (a checkpoint may be taken; `broke`: the body broke off there).
    `on_idle(n)`: the body has paused with everything up to n applied; it answers whether it
    is done with that position, and is asked again every IDLE or so until it is (a stalled
    resumable upload checkpoints that way, without waiting for more data).
    `final`: the body ends the stream (False for a segment of a resumable upload)."""
    loop = asyncio.get_running_loop()
    fed = 0  # body bytes handed to the decoder (reader.arrived: body bytes read)
    pending: asyncio.Future | None = None  # the worker's job
    pending_size = 0  # its body bytes, taken from the budget
    held = 0  # body bytes this pipeline has taken from the budget
    reader = _Reader(body)
    idle_done = 0  # the position on_idle last said it is done with

    async def settle() -> None:
        nonlocal pending, held
        assert pending is not None
        future, pending = pending, None
        more = await future
        while more is not None:
            header = next(more)
            assert isinstance(header, Header)
            await on_header(header)
            more = await loop.run_in_executor(None, applier.apply, more)
        budget.give(pending_size)
        held -= pending_size

    def dispatch(chunks: list, size: int, last: bool) -> None:
        """Hand what arrived to the worker (`last`: with the stream's end)."""
        nonlocal pending, pending_size, fed
        events = events_of(decoder, chunks, last)
        pending = loop.run_in_executor(None, applier.apply, events)
        pending_size = size
        fed = reader.arrived

    try:
        eof = False
        while not eof:
            batch: list = []
            size = 0
            since = 0.0
            while size < BATCH:
                if budget.spent:
                    if batch or pending is not None:
                        break  # hand over what is held, rather than wait with it
                    await budget.room()
                idle_owed = on_idle is not None and fed > idle_done
                try:
                    chunk = await reader.next(wake=bool(batch) or pending is not None or idle_owed)
                except BaseException:
                    # The body broke off: what arrived is applied (and a resumable upload
                    # checkpointed there) before the error goes up.
                    if pending is not None:
                        await settle()
                    if batch:
                        dispatch(batch, size, False)
                        await settle()
                    if fed:
                        await on_applied(fed, True)
                    raise
                if chunk is None:
                    if not batch and pending is None and on_idle is not None:
                        if await on_idle(fed):
                            idle_done = fed
                        continue
                    break  # the body paused: do not hold back what arrived
                if not chunk:
                    eof = True
                    break
                batch.append(chunk)
                size += len(chunk)
                budget.take(len(chunk))
                held += len(chunk)
                await on_received(reader.arrived)
                now = time.monotonic()
                if not since:
                    since = now
                elif now - since >= AGE:
                    break  # a trickle: do not wait for the batch to fill
            if pending is not None:
                await settle()
                await on_applied(fed, False)
            if batch or (eof and final):
                dispatch(batch, size, eof and final)
        if pending is not None:
            await settle()
            await on_applied(fed, False)
    finally:
        reader.close()
        if pending is not None:  # the worker may still be writing: the fd must outlive it
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()
        budget.give(held)
    return reader.arrived


class _Reader:
    """Reads the body, and tells a pause from a flow: a timer that looks every IDLE seconds
    wakes a reader that waits with something to hand over, if nothing arrived since it last
    looked. One timer per pipeline, not one per read: reads take microseconds, and a timer
    armed and cancelled around each cost a fifth of the event loop's time in an upload."""

    def __init__(self, body: Body):
        self.body = body
        self.arrived = 0  # body bytes read
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._seen = -1  # `arrived` when the timer last looked
        self._waiting = False  # the reader waits and wants to be woken by a pause
        self._woken = False  # the timer cancelled the reader's wait
        self._timer = self._loop.call_later(IDLE, self._look)

    def _look(self) -> None:
        if self._waiting and self.arrived == self._seen and not self._woken:
            assert self._task is not None
            self._woken = True
            self._task.cancel()  # the wait ends; `next` takes the cancel back
        self._seen = self.arrived
        self._timer = self._loop.call_later(IDLE, self._look)

    async def next(self, wake: bool) -> bytes | None:
        """The next bytes of the body (b"" at its end); None if `wake` and the body paused
        (nothing for IDLE to 2 x IDLE seconds)."""
        self._waiting = wake
        try:
            chunk = await self.body.readany()
        except asyncio.CancelledError:
            if self._woken:
                self._woken = False
                assert self._task is not None
                if self._task.uncancel() == 0:  # ours alone, not a cancel of the transfer
                    return None
            raise
        finally:
            self._waiting = False
        self.arrived += len(chunk)
        return chunk

    def close(self) -> None:
        self._timer.cancel()
