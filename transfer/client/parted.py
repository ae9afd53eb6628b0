"""`vdi-transfer upload --connections N` of a raw file: N parts sent at once.

The file's data (and the ranges of the old disk that must be zeroed) is cut into N parts of
about equal size, each a stretch of the disk, and each part goes as chunk framing over a
connection of its own, all under one task (the server's transfer/parts.py). A part that
breaks off is sent again, whole, with backoff for as long as --retry-for allows; the others
go on. The upload is complete when the server has every part."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import urllib.parse

from transfer.client.http import BACKOFF_MAX, RETRYABLE, Api, ClientError, error_of
from transfer.client.progress import Progress
from transfer.client.source import FramedRaw, merge, pieces

# A part re-sent at once may find the server still holding its broken connection.
PART_RETRYABLE = RETRYABLE | {"OTHER_OPERATION_IN_PROGRESS"}


class Stopped(Exception):
    """Another part failed (or the user interrupted): this one stops sending."""


def split(runs: list[tuple[int, int]], n: int) -> list[list[tuple[int, int]]]:
    """`runs` cut into at most `n` parts of about equal length, each a stretch of the disk,
    cut at PIECE boundaries (as the frames are)."""
    cut = list(pieces(runs))
    total = sum(length for _, length in cut)
    if not total:
        return [[]]  # nothing to send: one part with the end of the framing alone
    groups: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    before = 0
    for start, length in cut:
        groups[min(n - 1, before * n // total)].append((start, length))
        before += length
    return [merge(group, []) for group in groups if group]


class PartedUpload:
    """The parts of one upload, each on a thread and a connection of its own."""

    def __init__(self, api: Api, task: str, vdi: str, body: FramedRaw, connections: int,
                 progress: Progress, retry_for: float):  # fmt: skip
        self.api, self.task, self.vdi = api, task, vdi
        self.parts = split(body.runs, connections)
        self.body = body
        self.progress = progress
        self.retry_for = retry_for
        self.sent = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()  # counts and progress, from every part's thread
        progress.total = sum(length for runs in self.parts for _, length in runs)

    def run(self) -> None:
        """Every part sent (or the first error that is not a break)."""
        with concurrent.futures.ThreadPoolExecutor(len(self.parts)) as pool:
            futures = [pool.submit(self._send, i) for i in range(len(self.parts))]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                self.stop.set()  # the other parts stop sending
                raise
        task = self.api.call("GET", f"/tasks/{self.task}")
        if task["status"] != "success":
            raise ClientError(
                "UPLOAD_FAILED",
                f"every part was sent, but task {self.task} is {task['status']} "
                f"({task['upload_parts_done']} of {len(self.parts)} parts arrived)",
            )

    def _target(self, number: int) -> str:
        query = {"vdi": self.vdi, "task_id": self.task, "format": "raw", "chunked": "true",
                 "parts": str(len(self.parts)), "part": str(number)}  # fmt: skip
        return f"/import_raw_vdi?{urllib.parse.urlencode(query)}"

    def _send(self, number: int) -> None:
        """Part `number`, again after each break, until the server has it."""
        part = FramedRaw(self.body.fd, self.body.size, self.parts[number], self.body.must_zero)
        counted = 0  # its bytes already in the progress (a re-sent part counts once)
        deadline: float | None = None
        delay = 1.0
        while True:
            attempt = 0

            def pieces():
                nonlocal attempt, counted
                for data, _ in part.stream():
                    if self.stop.is_set():
                        raise Stopped
                    attempt += len(data)
                    with self._lock:
                        self.sent += len(data)
                        if attempt > counted:
                            self.progress.advance(attempt - counted)
                            counted = attempt
                    yield data

            try:
                response = self.api.request("PUT", self._target(number), pieces())
                if response.status == 200:
                    response.read()
                    return
                raise error_of(response)
            except Stopped:
                return
            except ClientError as exc:
                if exc.code not in PART_RETRYABLE or self.stop.is_set():
                    raise
                deadline = deadline or time.monotonic() + self.retry_for
                if time.monotonic() + delay > deadline:
                    raise ClientError(
                        exc.code, f"{exc.message} (gave up after {self.retry_for:g} s)"
                    ) from None
                self.progress.note(
                    f"part {number}: {exc.message}: sending it again in {delay:.0f} s"
                )
                if self.stop.wait(delay):
                    return
                delay = min(delay * 2, BACKOFF_MAX)
