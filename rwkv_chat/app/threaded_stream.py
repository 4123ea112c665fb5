"""A blocking stream of updates, run in a thread of its own and handed to asyncio: what the page's and the API's
streaming handlers iterate, so a stream that waits for tokens holds no thread of Gradio's.

Why: Gradio runs every `next()` of a synchronous generator in its thread pool (40 threads by default, shared with
every event's pre- and post-processing). A chat stream's `next()` waits for the model's next tokens, so 40
streams waiting at once held the whole pool: the others (and the processing of every update) queued behind them,
and on a GPU serving 128 chats most users waited seconds for a first token that the engine had long produced.
Here each stream waits in a thread of its own (a waiting thread costs no CPU), and the event loop only moves
finished updates.

What it promises:
- `async for item in threaded(factory)`: `factory()` is called, and the iterator it returns is iterated, in a new
  daemon thread, in a copy of the caller's context variables (so Gradio's toasts and progress bars raised there
  find their event). Items arrive in order.
- Newest wins: every item is a whole snapshot (the answer so far), so while the consumer is behind, a new item
  replaces the one still waiting for it, unless that one is the stream's first (the first update may carry what
  later ones leave out, such as clearing the message box). The last item is never replaced (nothing follows it).
- An exception raised by the factory or the iterator is raised to the consumer, the same object, after the items
  before it.
- When the consumer stops (aclose, cancellation, a dropped connection) the thread stops taking items: it closes
  the iterator (in its own thread, where a generator can be closed) as soon as the item it waits for arrives.
  The iterator is always closed when the thread ends.

It knows nothing of Gradio, chats or models.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Optional


class _Handover:
    """What the producing thread and the consuming task share (all under `lock`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.ready = asyncio.Event()  # set (from the loop) when there is something to take
        self.lock = threading.Lock()
        self.items: deque = deque()  # items not yet taken
        self.newest_replaceable = False  # the last of them may still be replaced by a newer one
        self.finished = False
        self.error: Optional[BaseException] = None
        self.signalled = False  # a wake-up of the consumer is already on its way
        self.abandoned = False  # the consumer has stopped: the thread takes no more items

    def put(self, item: Any, first: bool) -> bool:
        """Hand over one item; False when the consumer has gone (the producer should stop)."""
        with self.lock:
            if self.abandoned:
                return False
            if self.items and self.newest_replaceable:
                self.items[-1] = item
            else:
                self.items.append(item)
            self.newest_replaceable = not first
            self._signal()
        return True

    def finish(self, error: Optional[BaseException]) -> None:
        with self.lock:
            self.finished, self.error = True, error
            self._signal()

    def _signal(self) -> None:  # under lock
        if not self.signalled and not self.abandoned:
            self.signalled = True
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                self.abandoned = True

    def take(self) -> tuple[list, bool, Optional[BaseException]]:
        with self.lock:
            items = list(self.items)
            self.items.clear()
            self.newest_replaceable = False
            self.signalled = False
            return items, self.finished, self.error

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True


def _produce(factory: Callable[[], Iterable], handover: _Handover) -> None:
    error: Optional[BaseException] = None
    iterator = None
    try:
        iterator = iter(factory())
        first = True
        for item in iterator:
            if not handover.put(item, first):
                break
            first = False
    except BaseException as raised:  # noqa: BLE001 - handed to the consumer, who raises it
        error = raised
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception as raised:  # noqa: BLE001 - a failing close is the stream's error if it had none
                error = error or raised
        handover.finish(error)


async def threaded(factory: Callable[[], Iterable], name: str = "stream") -> AsyncIterator:
    """The items of `factory()`, produced in a thread of their own (see the module docstring)."""
    handover = _Handover(asyncio.get_running_loop())
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(_produce, factory, handover), name=name, daemon=True).start()
    try:
        while True:
            await handover.ready.wait()
            handover.ready.clear()
            items, finished, error = handover.take()
            for item in items:
                yield item
            if finished:
                if error is not None:
                    raise error
                return
    finally:
        handover.abandon()
