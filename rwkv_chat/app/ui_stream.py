"""Helpers the page and the API share: pacing a stream of chat updates, and wording failures for people.

Promises: `throttled` passes at most one update per STREAM_INTERVAL_S (the first, the last and every update
with an empty answer always pass), so a fast model does not flood browsers; `reason` gives the message of an
expected refusal as is, and logs anything unexpected with its traceback before naming it.
Plain Python: knows nothing of Gradio.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

from ..loading.loader import ModelLoadError
from .chat_service import Busy, ChatUpdate
from .draining import ShuttingDown

STREAM_INTERVAL_S = 0.05  # at most ~20 screen updates a second; the last one always goes out
USER_ERRORS = (ValueError, ModelLoadError, Busy, ShuttingDown)
log = logging.getLogger(__name__)


def throttled(updates: Iterator[ChatUpdate]) -> Iterator[ChatUpdate]:
    last = 0.0
    for update in updates:
        now = time.monotonic()
        if update.done or not update.answer or now - last >= STREAM_INTERVAL_S:
            last = now
            yield update


def reason(error: Exception) -> str:
    """What to tell people: the message of an expected refusal, or the kind and message of a failure."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    log.exception("request failed")
    return f"failed ({type(error).__name__}: {error})"
