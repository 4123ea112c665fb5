"""A graceful shutdown: stop taking new answers, let the running ones end, then say what happened.

Promises:
- `Admission` counts the generations running (page, gradio_client and OpenAI API alike). `guarded(stop, run)`
  wraps a generation's chunk iterator: it refuses to start once the admission is closed (`ShuttingDown`, whose
  message tells people their conversation is kept) and is counted until it ends or is closed.
- `drain(wait_s)` closes the admission, waits up to `wait_s` for the running generations to end, then asks the ones
  still running to stop (each keeps its partial answer, as with the Stop button) and waits up to STOP_GRACE_S more.
  It returns a `DrainReport`.
- `on_sigterm(...)` makes SIGTERM drain, close the conversation store (flushing it) and log each step, then end
  the process the way Ctrl-C does (the web server closes). Call it from the main thread.
Knows nothing of Gradio, models or what a conversation is.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

STOP_GRACE_S = 5.0
SHUTTING_DOWN = "the server is restarting and takes no new messages now; your conversation is saved: send again " \
                "in a moment"


class ShuttingDown(RuntimeError):
    """The server is draining; nothing new starts."""


@dataclass(frozen=True)
class DrainReport:
    running: int  # generations running when the drain began
    finished: int  # of those, ended by themselves within the wait
    stopped: int  # asked to stop after the wait (their partial answers are kept)
    left: int  # still running when the drain gave up
    seconds: float

    def line(self) -> str:
        return (f"{self.running} answers were being written: {self.finished} finished, {self.stopped} stopped "
                f"early (partial answers kept), {self.left} still running after the grace time; "
                f"{self.seconds:.1f} s")


class Admission:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._changed = threading.Condition()
        self._open = True
        self._running: dict[int, threading.Event] = {}
        self._next = 0

    @property
    def open(self) -> bool:
        return self._open

    def running_count(self) -> int:
        with self._changed:
            return len(self._running)

    def check(self) -> None:
        """ShuttingDown when no new generation may start."""
        if not self._open:
            raise ShuttingDown(SHUTTING_DOWN)

    def guarded(self, stop: threading.Event, run: Iterator) -> Iterator:
        """`run`'s items, counted as one running generation; refused once closed."""
        with self._changed:
            self.check()
            ticket, self._next = self._next, self._next + 1
            self._running[ticket] = stop
        try:
            yield from run
        finally:
            close = getattr(run, "close", None)
            if close is not None:
                close()
            with self._changed:
                del self._running[ticket]
                self._changed.notify_all()

    def drain(self, wait_s: float) -> DrainReport:
        start = self._clock()
        with self._changed:
            self._open = False
            running = len(self._running)
            self._changed.wait_for(lambda: not self._running, timeout=max(wait_s, 0.0))
            unfinished = list(self._running.values())
            for stop in unfinished:
                stop.set()
            self._changed.wait_for(lambda: not self._running, timeout=STOP_GRACE_S)
            left = len(self._running)
        return DrainReport(running, running - len(unfinished), len(unfinished) - left, left, self._clock() - start)


def on_sigterm(admission: Admission, wait_s: float, flush: Callable[[], str], log: Callable[[str], None]) -> None:
    """Install the SIGTERM handler: drain (up to `wait_s`), `flush()` (returns what it did, for the log), then raise
    KeyboardInterrupt in the main thread, which closes the web server as Ctrl-C does."""
    def handle(signum, frame):
        log(f"rwkv-chat: SIGTERM: taking no new messages; waiting up to {wait_s:g} s for "
            f"{admission.running_count()} answers being written")
        report = admission.drain(wait_s)
        log(f"rwkv-chat: {report.line()}")
        log(f"rwkv-chat: {flush()}")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)
