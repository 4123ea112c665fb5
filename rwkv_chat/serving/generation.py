"""One reply's token loop, apart from who runs its model steps.

What this module promises:
- A judge (anything with `accept(token, logits) -> Verdict`) decides every sampled token: FEED it and
  sample the next one, feed it as the LAST one, or STOP before feeding it. It gets the logits row the
  token was drawn from (a view: clone it to keep it). The judge is where a reply records what it keeps
  (text, ids, penalties); whatever thread runs the loop calls it, one token at a time, in order.
- A decoder's `generate(logits, state, sampler, judge)` starts the loop from the logits and state after
  the prompt and returns a `Generation`. Iterating it waits for progress: each item means the judge
  accepted one or more tokens since the previous item (a slow reader gets several at once). When the
  iteration ends, `.logits` / `.state` hold where the reply stopped: after a STOP, the state before the
  refused token and the logits it was drawn from; after a LAST, the state after that token and its
  logits. `close()` (also run when an iteration is abandoned half-way) stops the loop early; the result is
  then undefined. Errors of the model, the sampling or the judge are raised by the iteration.
- `DirectDecoder` runs the loop in the reader's own thread: sample, judge, hand the token to the reader,
  one model step. `batching.DecodeBatcher` runs it in a worker, batched with other chats.
- A decoder also reads prompts: `read(ids, state)` -> (logits [vocab], state after `ids`), model.forward's
  result, one read at a time (concurrent callers wait their turn, each read then runs at the device's full speed
  instead of all of them sharing it and finishing as late as the last). `DirectDecoder` reads in the caller's
  thread; the batcher says where it reads.

It knows the sampling `Sampler`, `RwkvState` and a model's `forward`; nothing of text or sessions.
"""

from __future__ import annotations

import enum
import threading
from typing import Iterator, Optional

import torch

from ..state import RwkvState
from .sampling import Sampler


class Verdict(enum.Enum):
    FEED = "feed"  # keep the token, feed it, sample the next one
    LAST = "last"  # keep the token, feed it, sample nothing more
    STOP = "stop"  # drop the token; the reply ends before it


class Generation:
    """The progress and result of one reply's loop (see the module docstring)."""

    logits: Optional[torch.Tensor]
    state: Optional[RwkvState]

    def __iter__(self) -> Iterator[None]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop early (idempotent)."""


class DirectGeneration(Generation):
    def __init__(self, model, logits: torch.Tensor, state: RwkvState, sampler: Sampler, judge):
        self.model, self.sampler, self.judge = model, sampler, judge
        self.logits, self.state = logits, state
        self._closed = False

    def __iter__(self) -> Iterator[None]:
        while not self._closed:
            token = self.sampler.sample(self.logits)
            verdict = self.judge.accept(token, self.logits)
            if verdict is Verdict.STOP:
                return
            yield  # the reader sees the token before the step that feeds it
            self.logits, self.state = self.model.forward([token], self.state)
            if verdict is Verdict.LAST:
                return

    def close(self) -> None:
        self._closed = True


class DirectDecoder:
    """Runs each reply's loop in its reader's thread, one chat at a time (no batching)."""

    def __init__(self, model):
        self.model = model
        self._reading = threading.Lock()

    def read(self, ids, state: Optional[RwkvState] = None) -> tuple[torch.Tensor, RwkvState]:
        with self._reading:
            return self.model.forward(ids, state)

    def generate(self, logits: torch.Tensor, state: RwkvState, sampler: Sampler, judge) -> Generation:
        return DirectGeneration(self.model, logits, state, sampler, judge)
