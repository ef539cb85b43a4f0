"""Progress lines for long data jobs, and a background producer thread with a bounded queue."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

INTERVAL_S = 5.0
"""Seconds between progress lines when stderr is not a terminal (logs keep every line)."""
TTY_INTERVAL_S = 0.5


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class Progress:
    """Documents, tokens and throughput on stderr: a line rewritten in place on a terminal, a
    new line every ``INTERVAL_S`` seconds otherwise."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last = self.t0
        self._open_line = False

    def line(self, phase: str, *, docs: int, tokens: int = 0, nbytes: int = 0, since: float = 0.0,
             force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < (TTY_INTERVAL_S if self.tty else INTERVAL_S):
            return
        self._last = now
        dt = max(now - (since or self.t0), 1e-9)
        parts = [f"prepare: {phase}: {docs:,} documents"]
        if tokens:
            parts.append(f"{tokens:,} tokens ({_human(tokens / dt)} tok/s)")
        if nbytes:
            parts.append(f"{nbytes / 2**20:,.1f} MiB read ({nbytes / 2**20 / dt:,.1f} MiB/s)")
        parts.append(f"{now - self.t0:,.0f} s")
        text = ", ".join(parts)
        if self.tty:
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)
            self._open_line = True
        else:
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.close_line()
            print(f"prepare: {text}", file=self.stream, flush=True)

    def close_line(self) -> None:
        if self._open_line:
            print(file=self.stream, flush=True)
            self._open_line = False


_DONE = object()


class background(Iterator[T]):  # lower case: used like a generator function
    """Iterate ``items`` in a daemon thread, ``depth`` items ahead; exceptions re-raise in the
    consumer; ``close`` (or the end of a ``with`` block) stops the producer."""

    def __init__(self, items: Iterable[T], depth: int = 2) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True,
                                        name="alum_ds-background")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None and self._stop.is_set():
                close()

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is _DONE:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        self._thread.join(timeout=5)

    def __enter__(self) -> background[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
