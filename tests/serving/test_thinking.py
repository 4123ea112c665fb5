"""RWKV-7 G1 thinking: the prompt's ending per mode, the reasoning kept out of the answer (engine, service, page
messages), and the state carrying the whole turn as the model wrote it."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.app.chat_service import ChatService, ChatSettings, Conversation
from rwkv_chat.prompts import USER_ASSISTANT, split_reasoning, user_turn_text
from rwkv_chat.serving.engine import ChatEngine, GenerationSettings
from rwkv_chat.serving.sampling import SamplingParams
from rwkv_chat.serving.session import ChatSession
from rwkv_chat.state import RwkvState
from rwkv_chat.tokenizer import WorldTokenizer

GREEDY = SamplingParams(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)
THOUGHT = ">\nThe user asks about France.\n</think>\nParis is its capital.\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


class WritingModel:
    """A stand-in model that writes `text`'s tokens in order after whatever prompt it first reads (then the
    turn separator); its state is the list of every token it has read."""

    class config:
        vocab_size = 65536

    device = torch.device("cpu")

    def __init__(self, tokenizer, text: str):
        self.script = tokenizer.encode(text)
        self.start = None

    def forward(self, tokens, state=None):
        history = ([] if state is None else state.shift.flatten().long().tolist()) + list(tokens)
        self.start = len(history) if self.start is None else self.start
        written = len(history) - self.start
        logits = torch.zeros(65536)
        logits[self.script[written] if written < len(self.script) else 261] = 10.0
        return logits, RwkvState(torch.tensor(history, dtype=torch.float32), torch.zeros(1))


def reply(engine, session, message, think):
    return list(engine.reply(session, message, GenerationSettings(GREEDY, 60, think=think)))


@pytest.mark.parametrize("think,ending", [("off", "Assistant:"), ("think", "Assistant: <think"),
                                          ("fake think", "Assistant: <think></think")])
def test_the_prompt_ends_as_the_mode_says(tokenizer, think, ending):
    text = tokenizer.decode(ChatSession(USER_ASSISTANT.name).prompt_ids(tokenizer, "Hello", think=think))
    assert text == f"User: Hello\n\n{ending}"


def test_reasoning_streams_apart_from_the_answer_and_the_state_keeps_everything(tokenizer):
    engine = ChatEngine(WritingModel(tokenizer, THOUGHT), tokenizer)
    chunks = reply(engine, ChatSession(USER_ASSISTANT.name), "Capital of France?", "think")
    final = chunks[-1]
    assert final.done and final.text == "Paris is its capital." and final.reasoning == "The user asks about France."
    assert not final.thinking and any(chunk.thinking for chunk in chunks[:-1])
    for chunk in chunks:
        assert "think" not in chunk.text and "France" not in chunk.text  # the answer never shows the reasoning
    turn = final.session.turns[-1]
    assert (turn.answer, turn.reasoning, turn.think) == ("Paris is its capital.", "The user asks about France.",
                                                        "think")
    assert turn.fed_text == THOUGHT[:-2]  # everything the model wrote, the stop separator aside, was fed
    hit = engine.cache.longest_prefix(final.session.context_ids(tokenizer))
    assert hit.state.shift.flatten().long().tolist() == list(turn.prompt_ids + turn.answer_ids)
    assert final.session.text() == ("User: Capital of France?\n\nAssistant: <think" + THOUGHT[:-2])
    follow_up = tokenizer.decode(final.session.prompt_ids(tokenizer, "And Spain?", think="think"))
    assert follow_up == "\n\nUser: And Spain?\n\nAssistant: <think"


def test_fake_think_answers_at_once(tokenizer):
    engine = ChatEngine(WritingModel(tokenizer, "> Paris is its capital.\n\n"), tokenizer)
    final = reply(engine, ChatSession(USER_ASSISTANT.name), "Capital of France?", "fake think")[-1]
    assert (final.text, final.reasoning) == ("Paris is its capital.", "")
    assert final.session.text().endswith("Assistant: <think></think> Paris is its capital.")


def test_the_page_shows_the_thinking_folded_above_the_answer_and_edits_map_to_turns(tokenizer):
    class Pool:
        def get(self, key, progress=None):
            return ChatEngine(WritingModel(tokenizer, THOUGHT), tokenizer)

    service = ChatService(Pool())
    settings = ChatSettings(max_new_tokens=60, temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                            prompt_style=USER_ASSISTANT.name, think="think")
    conversation = Conversation("model", ChatSession(USER_ASSISTANT.name))
    updates = list(service.reply(conversation, "Capital of France?", settings))
    thinking = [m for u in updates[:-1] for m in u.messages if m.get("metadata")]
    assert thinking and thinking[0]["metadata"] == {"title": "Thinking", "status": "pending"}
    final = updates[-1].conversation
    assert updates[-1].answer == "Paris is its capital." and updates[-1].reasoning == "The user asks about France."
    messages = final.messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    assert messages[1] == {"role": "assistant", "content": "The user asks about France.",
                           "metadata": {"title": "Thinking", "status": "done"}}
    assert messages[2] == {"role": "assistant", "content": "Paris is its capital."}
    assert final.history() == [["Capital of France?", "Paris is its capital.", "The user asks about France."]]
    two = Conversation("model", final.session.with_turn(final.session.turns[0]))
    assert [two.turn_of_message(i) for i in range(6)] == [0, None, None, 1, None, None]


@pytest.mark.parametrize("generated,think,expected", [
    ("> Paris.", "fake think", ("", "Paris.", False)),
    (">\nhmm, France\n</think>\nParis.", "think", ("hmm, France", "Paris.", False)),
    (">\nstill going", "think", ("still going", "", True)),
    (" <think>\nhmm\n</think>\nParis.", "off", ("hmm", "Paris.", False)),  # a model that thinks unasked
    (" Paris.", "off", ("", "Paris.", False)),
])
def test_split_reasoning(generated, think, expected):
    split = split_reasoning(generated, think)
    assert (split.reasoning, split.answer, split.thinking) == expected


def test_an_unknown_think_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="think must be one of 'off', 'think', 'fake think'"):
        GenerationSettings(think="deep")
    with pytest.raises(ValueError, match="think must be one of"):
        ChatSettings(think="maybe").generation()
    assert user_turn_text(USER_ASSISTANT, "Hi", think="think").endswith("Assistant: <think")
