"""A warning while the trainer waits long on the data pipeline.

A rank stuck reading its next batch (a hung network file system, a worker caught in a huge image)
blocks its main thread, so nothing it would log at the end of a step appears; the other ranks wait
in their next collective until its timeout, and the error they report names the collective, not
the cause. A background thread watches the wait and says, on the rank that waits, how long it has
been waiting and in which step.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger(__name__)


class WaitWatch:
    """`with watch.waiting(step): batch = next(it)` warns after `first_s` seconds of waiting, then
    each time the wait doubles, and once more when the batch comes after a warning."""

    def __init__(
        self,
        rank: int,
        first_s: float = 60.0,
        poll_s: float = 1.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        assert first_s > 0 and poll_s > 0
        self.rank = rank
        self.first_s = first_s
        self.poll_s = poll_s
        self._warn = warn or logger.warning
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the wait in progress
        self._step = 0
        self._next_s = first_s  # wait after which the next warning is due
        self._warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self, step: int) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="data-wait-watch", daemon=True)
            self._thread.start()
        with self._lock:
            self._since, self._step, self._next_s, self._warned = time.monotonic(), step, self.first_s, False
        try:
            yield
        finally:
            with self._lock:
                waited, warned = time.monotonic() - self._since, self._warned
                self._since = None
            if warned:
                self._warn(f"rank {self.rank}: the data for step {step} came after {waited:.0f} s")

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                if self._since is None:
                    continue
                waited = time.monotonic() - self._since
                if waited < self._next_s:
                    continue
                self._next_s *= 2
                self._warned = True
                step = self._step
            self._warn(
                f"rank {self.rank}: waiting {waited:.0f} s for the data of step {step} (a stuck "
                "image read, e.g. on a network file system, or a worker caught in one sample); "
                "the other ranks wait for this one in their next collective"
            )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s)
            self._thread = None
