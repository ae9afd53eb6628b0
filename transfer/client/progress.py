"""Progress of a long transfer: a bar with rate and ETA on a terminal (tqdm), plain lines
on stderr otherwise (a log, a CI job), nothing with --quiet."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

LINE_INTERVAL = 2.0  # seconds between plain progress lines


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """`advance(n)` as bytes of `total` (None: unknown) are done; `close()` at the end."""

    def __init__(self, label: str, total: int | None, quiet: bool = False,
                 stream: TextIO | None = None):  # fmt: skip
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar = None
        self.quiet = quiet
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            # A pseudo-terminal of unknown size (script, some CI): tqdm would hide the bar.
            width, height = shutil.get_terminal_size((0, 0))
            self._bar = tqdm(
                total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                file=self.stream, smoothing=0.1, dynamic_ncols=width > 0,
                ncols=None if width > 0 else 100, nrows=None if height > 0 else 24,
            )  # fmt: skip

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.quiet:
            now = time.monotonic()
            if now - self._last_line >= LINE_INTERVAL:
                self._last_line = now
                self._line(now)

    def set(self, done: int) -> None:
        """Jump to `done` (a resumed transfer starts past 0)."""
        self.advance(done - self.done)

    def _line(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {_size(self.done)}"
        if self.total:
            pct = 100 * self.done / self.total
            text += f" of {_size(self.total)} ({pct:.0f}%)"
            if rate > 0 and self.done < self.total:
                text += f", ETA {(self.total - self.done) / rate:.0f} s"
        text += f", {_size(rate)}/s"
        print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A message between progress lines (a retry, say)."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet:
            self._line(time.monotonic())
