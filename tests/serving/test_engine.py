"""The chat engine: stop rules and state bookkeeping (scripted model), state carry and cache (tiny real models)."""

from __future__ import annotations

import threading

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.serving.engine import ChatEngine, GenerationSettings
from rwkv_chat.serving.sampling import SamplingParams
from rwkv_chat.serving.session import ChatSession
from rwkv_chat.state import RwkvState
from rwkv_chat.tokenizer import WorldTokenizer

GREEDY = SamplingParams(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


class ScriptedModel:
    """A stand-in model whose state is the list of tokens it has read and whose prediction after token t is
    `script[t]` (or token 33 " " when t is not in the script). Lets a test dictate what is generated."""

    class config:
        vocab_size = 65536

    device = torch.device("cpu")

    def __init__(self, script: dict[int, int]):
        self.script = script
        self.reads = []  # every forward call's tokens

    def forward(self, tokens, state=None):
        self.reads.append(list(tokens))
        history = ([] if state is None else state.shift.flatten().long().tolist()) + list(tokens)
        logits = torch.zeros(65536)
        logits[self.script.get(history[-1], 33)] = 10.0
        return logits, RwkvState(torch.tensor(history, dtype=torch.float32), torch.zeros(1))

    @staticmethod
    def history(state) -> list[int]:
        return state.shift.flatten().long().tolist()


def run(chunks):
    chunks = list(chunks)
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    return chunks


def chain(*tokens):
    """A script that makes the model write `tokens` in order after the prompt's last token (59, ':')."""
    previous = [59, *tokens]
    return dict(zip(previous[:-1], previous[1:]))


def last_state(engine, session):
    hit = engine.cache.longest_prefix(session.context_ids(engine.tokenizer))
    assert hit.length == len(session.context_ids(engine.tokenizer))
    return hit.state


def test_separator_token_is_not_fed_and_next_turn_adds_it(tokenizer):
    model = ScriptedModel(chain(3880, 261))  # " Hi", "\n\n"
    engine = ChatEngine(model, tokenizer)
    final = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 20)))[-1]
    assert final.text == "Hi" and final.stats.stop_reason == "separator"
    session = final.session
    assert session.turns[-1].answer_ids == (3880,)
    assert ScriptedModel.history(last_state(engine, session)) == list(session.turns[-1].prompt_ids) + [3880]
    next_prompt = session.prompt_ids(tokenizer, "Again")
    assert tokenizer.decode(next_prompt) == "\n\nQuestion: Again\n\nAnswer:"


def test_separator_split_over_two_newline_tokens_keeps_state_and_text_consistent(tokenizer):
    model = ScriptedModel(chain(3880, 11, 11))  # " Hi", "\n", "\n"
    engine = ChatEngine(model, tokenizer)
    chunks = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 20)))
    assert all(not c.text.endswith("\n") for c in chunks)  # a lone trailing newline is held back
    session = chunks[-1].session
    assert session.turns[-1].answer == "Hi" and session.turns[-1].answer_ids == (3880, 11)
    assert ScriptedModel.history(last_state(engine, session))[-2:] == [3880, 11]
    assert tokenizer.decode(session.prompt_ids(tokenizer, "Again")) == "\nQuestion: Again\n\nAnswer:"
    assert session.with_turn(session.turns[0]).text().count("Hi\n\nQuestion") == 1


def test_text_sharing_the_separator_token_is_fed(tokenizer):
    model = ScriptedModel(chain(3880, 3336))  # " Hi", " \n\n"
    engine = ChatEngine(model, tokenizer)
    session = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 20)))[-1].session
    turn = session.turns[-1]
    assert turn.fed_text == " Hi " and tokenizer.decode(turn.answer_ids) == " Hi "
    assert ScriptedModel.history(last_state(engine, session))[-len(turn.answer_ids):] == list(turn.answer_ids)


def test_end_of_text_ends_the_answer_and_is_never_shown(tokenizer):
    model = ScriptedModel(chain(3880, 0))
    engine = ChatEngine(model, tokenizer)
    final = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 20)))[-1]
    assert final.text == "Hi" and final.stats.stop_reason == "end_of_text"
    assert ScriptedModel.history(last_state(engine, final.session))[-2:] == [59, 3880]


def test_max_tokens_feeds_every_shown_token(tokenizer):
    model = ScriptedModel({})  # always " "... then " " again
    engine = ChatEngine(model, tokenizer)
    final = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 5)))[-1]
    assert final.stats.stop_reason == "max_tokens" and final.stats.new_tokens == 5
    assert ScriptedModel.history(last_state(engine, final.session))[-5:] == [33] * 5


def test_one_model_step_per_kept_token_and_none_after_the_last(tokenizer):
    model = ScriptedModel({})
    engine = ChatEngine(model, tokenizer)
    run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 5)))
    assert len(model.reads[0]) > 1 and model.reads[1:] == [[33]] * 5  # the prompt, then each kept token once


def test_penalties_count_a_token_before_the_step_that_feeds_it(tokenizer):
    """After " Hi" the model says " Hi" again (logit 10, the rest 0); a presence penalty of 20 counted before
    that step pushes it below the rest, so greedy takes the lowest id (end-of-text) and the answer stops."""
    model = ScriptedModel(chain(3880, 3880, 3880))
    engine = ChatEngine(model, tokenizer)
    params = SamplingParams(temperature=0.0, presence_penalty=20.0, frequency_penalty=0.0)
    final = run(engine.reply(ChatSession(), "Hello", GenerationSettings(params, 10)))[-1]
    assert final.text == "Hi" and final.stats.stop_reason == "end_of_text"
    unpenalised = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 3)))[-1]
    assert unpenalised.text == "Hi Hi Hi"


def test_stop_keeps_the_partial_answer_and_the_matching_state(tokenizer):
    model = ScriptedModel(chain(3880, 3880, 3880, 3880))
    engine = ChatEngine(model, tokenizer)
    stop = threading.Event()
    chunks = []
    for chunk in engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 20), stop):
        chunks.append(chunk)
        if len(chunks) == 2:
            stop.set()
    final = chunks[-1]
    assert final.stats.stop_reason == "stopped" and final.text == "Hi Hi"
    turn = final.session.turns[-1]
    assert turn.answer_ids == (3880, 3880)
    assert ScriptedModel.history(last_state(engine, final.session))[-3:] == [59, 3880, 3880]


def test_emoji_split_over_tokens_streams_without_broken_characters(tokenizer):
    model = ScriptedModel(chain(33, 3319, 153, 129, 261))  # " ", then 😀 as three tokens
    engine = ChatEngine(model, tokenizer)
    chunks = run(engine.reply(ChatSession(), "Hello", GenerationSettings(GREEDY, 20)))
    assert all("\ufffd" not in c.text for c in chunks)
    assert chunks[-1].text == "😀"


# ------------------------------------------------------------------------------ tiny real models

@pytest.fixture(scope="module", params=["5.2", "6", "7"], ids=lambda v: f"v{v}")
def engine(request, make_checkpoint, tokenizer):
    model = load_model(make_checkpoint(request.param, n_layer=2, n_embd=128).path, device="cpu")
    return ChatEngine(model, tokenizer, label="tiny")


def chat(engine, session, message, seed=0, tokens=8):
    return run(engine.reply(session, message, GenerationSettings(SAMPLED, tokens, seed)))[-1]


def test_each_turn_prefills_only_its_own_new_tokens(engine, tokenizer):
    session = ChatSession()
    for index, message in enumerate(["Hello there", "What is RWKV?", "Thanks", "More please", "Bye"]):
        expected = len(session.prompt_ids(tokenizer, message))
        final = chat(engine, session, message)
        assert final.stats.prefill_tokens == expected
        assert final.stats.line().startswith(f"prefill {expected} tok · TTFT ")
        session = final.session
    assert len(session.context_ids(tokenizer)) > 5 * expected


def test_carried_state_equals_reading_the_whole_conversation(engine, tokenizer):
    session = ChatSession()
    for message in ["One", "Two", "Three"]:
        session = chat(engine, session, message).session
    cached = last_state(engine, session)
    _, whole = engine.model.forward(list(session.context_ids(tokenizer)))
    assert torch.allclose(cached.wkv, whole.wkv, rtol=1e-4, atol=1e-4)
    assert tokenizer.decode(session.context_ids(tokenizer)) == session.text()


def test_retry_restarts_from_the_prompt_state(engine, tokenizer):
    session = chat(engine, chat(engine, ChatSession(), "First").session, "Second", seed=1).session
    again = run(engine.regenerate(session, GenerationSettings(SAMPLED, 8, seed=1)))[-1]
    assert again.stats.prefill_tokens == 0
    assert again.session.turns == session.turns  # same seed, same state: same answer
    other = run(engine.regenerate(session, GenerationSettings(SAMPLED, 8, seed=2)))[-1]
    assert other.session.turns[0] == session.turns[0] and len(other.session.turns) == 2


def test_cache_miss_rebuilds_the_same_state(engine, tokenizer):
    session = chat(engine, ChatSession(), "Remember this", seed=3).session
    with_cache = chat(engine, session, "And now?", seed=4)
    engine.cache.clear()
    rebuilt = chat(engine, session, "And now?", seed=4)
    assert rebuilt.stats.prefill_tokens == len(session.context_ids(tokenizer)) + len(
        session.prompt_ids(tokenizer, "And now?"))
    assert rebuilt.session.turns == with_cache.session.turns


def test_edit_and_undo_return_to_the_earlier_state(engine, tokenizer):
    start = chat(engine, ChatSession(), "Hi", seed=5).session
    two = chat(engine, start, "Original", seed=6).session
    edited = run(engine.edit(two, 1, "Edited", GenerationSettings(SAMPLED, 8, 7)))[-1]
    direct = chat(engine, start, "Edited", seed=7)
    assert edited.stats.prefill_tokens == len(start.prompt_ids(tokenizer, "Edited"))
    assert edited.session.turns == direct.session.turns
    undone = two.truncated(1)
    assert chat(engine, undone, "Next", seed=8).stats.prefill_tokens == len(undone.prompt_ids(tokenizer, "Next"))


def test_shared_preamble_is_read_once_for_all_sessions(engine, tokenizer):
    preamble = "You are a helpful assistant who answers briefly."
    session = ChatSession(preamble=preamble)
    assert engine.warm_preamble(session) == len(session.preamble_ids(tokenizer))
    assert engine.warm_preamble(session) == 0
    engine.cache.clear()  # pinned entries survive
    for message in ["Alice here", "Bob here"]:
        assert chat(engine, session, message).stats.prefill_tokens == len(session.prompt_ids(tokenizer, message))


def test_bad_requests_get_clear_errors_and_change_nothing(engine):
    session = ChatSession()
    with pytest.raises(ValueError, match="empty"):
        engine.reply(session, "   \n ", GenerationSettings())
    with pytest.raises(ValueError, match="characters; the limit"):
        engine.reply(session, "x" * 20_000, GenerationSettings())
    with pytest.raises(ValueError, match="tokens long; the limit"):
        engine.reply(session, "😀" * 2_000, GenerationSettings())
    with pytest.raises(ValueError, match="max new tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="no answer to regenerate"):
        engine.regenerate(session, GenerationSettings())
    assert session.turns == ()


def test_concurrent_turns_read_their_prompts_one_at_a_time(tokenizer):
    """Prompts of concurrent turns are read one after the other (no two prompt reads overlap; the direct
    decoder's one-token steps run in each turn's own thread), and each turn still gets its own answer."""

    class CountingModel(ScriptedModel):
        def __init__(self, script):
            super().__init__(script)
            self.inside, self.most = 0, 0
            self.lock = threading.Lock()

        def forward(self, tokens, state=None):
            if len(tokens) == 1:  # a decode step
                return super().forward(tokens, state)
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                threading.Event().wait(0.02)  # long enough for the other threads to arrive meanwhile
                return super().forward(tokens, state)
            finally:
                with self.lock:
                    self.inside -= 1

    model = CountingModel(chain(3880, 261))
    engine = ChatEngine(model, tokenizer)
    answers = {}

    def turn(i):
        answers[i] = run(engine.reply(ChatSession(), f"Hello {i}", GenerationSettings(GREEDY, 20)))[-1].text

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == {i: "Hi" for i in range(6)}
    assert model.most == 1 and len(model.reads) >= 6
