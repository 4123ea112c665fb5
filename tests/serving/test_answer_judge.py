"""engine.AnswerJudge's stop rules against a whole-text search: the judge searches only the end of its text that a
stop completed by the new piece can begin in, and must find the same stops at the same places."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from rwkv_chat.prompts import TURN_SEPARATOR, find_stop
from rwkv_chat.serving.engine import AnswerJudge
from rwkv_chat.serving.generation import Verdict
from rwkv_chat.serving.sampling import PenaltyState, SamplingParams

PIECES = ["a", "b", "\n", "\n\n", "User", ":", " ", "ab", "b\n", "", "END", "E", "N", "D", "é"]


class _Stream:
    """A tokenizer stream whose token i decodes to PIECES[i - 1] (token 0 is the end of text)."""

    def push(self, token: int) -> str:
        return PIECES[token - 1]


class _Tokenizer:
    def stream_decoder(self) -> _Stream:
        return _Stream()


def _oracle(pieces: list[str], stop_strings: tuple[str, ...], turn_ends_answer: bool):
    """(tokens kept, (piece, cut)) by searching the whole text after every piece, or (all, None)."""
    text = ""
    for n, piece in enumerate(pieces):
        whole = text + piece
        cuts = [find_stop(whole)] if turn_ends_answer else []
        cuts += [whole.find(s) for s in stop_strings if whole.find(s) >= 0]
        cuts = [cut for cut in cuts if cut is not None]
        if cuts:
            return n, (piece, min(cuts))
        text = whole
    return len(pieces), None


@pytest.mark.parametrize("stop_strings,turn_ends_answer", [((), True), (("END",), True), (("END", "b\nU"), False),
                                                           (("User:",), True), (("",), False)])
def test_the_judge_stops_where_a_search_of_the_whole_text_does(stop_strings, turn_ends_answer):
    assert TURN_SEPARATOR == "\n\n"  # the pieces above are chosen to build it across tokens
    rng = random.Random(0)
    vocab = len(PIECES) + 1
    logits = torch.zeros(vocab)
    stopped = 0
    for trial in range(300):
        tokens = [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 40))]
        judge = AnswerJudge(_Tokenizer(), PenaltyState.from_params(SamplingParams(), vocab), 10**6,
                            threading.Event(), stop_strings, turn_ends_answer)
        kept, separator = _oracle([PIECES[t - 1] for t in tokens], stop_strings, turn_ends_answer)
        verdicts = []
        for token in tokens:
            verdicts.append(judge.accept(token, logits))
            if verdicts[-1] is Verdict.STOP:
                break
        assert judge.ids == tokens[:kept], f"trial {trial}"
        assert judge.separator == separator, f"trial {trial}"
        assert (verdicts[-1] is Verdict.STOP) == (separator is not None)
        stopped += separator is not None
    assert stopped > 30  # the trials do exercise stops (most of them across pieces)
