"""Helpers the page and the API share: pacing a stream of chat updates, and wording failures for people.

Promises: `StreamPace.throttled` passes at most one update of a stream per interval (the first, the last and
every update with an empty answer always pass), so a fast model does not flood browsers. The interval is
STREAM_INTERVAL_S, longer while so many streams of the pace run at once that together they would pass more than
MAX_UPDATES_PER_S: every update is work for the server's one Python process (Gradio serialises the outputs and
sends them), and a GPU serving 128 chats at 20 updates a second each would ask it for 2,560 a second. (Its
effect on the load test's aggregate was not measured apart from the other fixes of that run.) `reason` gives
the message of an expected refusal as is, and logs anything unexpected with its traceback before naming it.
Plain Python: knows nothing of Gradio.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

from ..loading.loader import ModelLoadError
from .chat_service import Busy, ChatUpdate
from .draining import ShuttingDown

STREAM_INTERVAL_S = 0.05  # at most ~20 screen updates a second; the last one always goes out
MAX_UPDATES_PER_S = 400  # ... and all streams of a pace together at most this many (5 a second each at 80 streams)
USER_ERRORS = (ValueError, ModelLoadError, Busy, ShuttingDown)
log = logging.getLogger(__name__)


class StreamPace:
    """The pacing shared by the streams of one server (see the module docstring). Thread-safe."""

    def __init__(self, updates_per_s: float = MAX_UPDATES_PER_S):
        self.updates_per_s = updates_per_s
        self.streams = 0  # streams running now
        self._lock = threading.Lock()

    def interval(self) -> float:
        """Seconds between two updates of one stream now."""
        return max(STREAM_INTERVAL_S, self.streams / self.updates_per_s)

    def throttled(self, updates: Iterator[ChatUpdate]) -> Iterator[ChatUpdate]:
        with self._lock:
            self.streams += 1
        try:
            last = 0.0
            for update in updates:
                now = time.monotonic()
                if update.done or not update.answer or now - last >= self.interval():
                    last = now
                    yield update
        finally:
            with self._lock:
                self.streams -= 1


def reason(error: Exception) -> str:
    """What to tell people: the message of an expected refusal, or the kind and message of a failure."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    log.exception("request failed")
    return f"failed ({type(error).__name__}: {error})"
