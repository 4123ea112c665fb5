"""Prompt text: exact template strings, canonical multi-turn text, message cleaning, stop rules."""
import pytest

from rwkv_chat.tokenizer import EOT_ID
from rwkv_chat.prompts import (
    DEFAULT_TEMPLATE,
    INSTRUCTION_RESPONSE,
    QUESTION_ANSWER,
    TEMPLATES,
    TURN_SEPARATOR,
    USER_ASSISTANT,
    answer_text,
    clean_message,
    conversation_text,
    find_stop,
    first_turn_text,
    get_template,
    next_turn_text,
    preamble_text,
    separator_rest,
    stream_safe_length,
    strip_answer,
    user_turn_text,
)


@pytest.mark.parametrize(
    "template,first,later",
    [
        (QUESTION_ANSWER, "Question: hi\n\nAnswer:", "\n\nQuestion: hi\n\nAnswer:"),
        (USER_ASSISTANT, "User: hi\n\nAssistant:", "\n\nUser: hi\n\nAssistant:"),
        (INSTRUCTION_RESPONSE, "Instruction: hi\n\nResponse:", "\n\nInstruction: hi\n\nResponse:"),
    ],
)
def test_exact_turn_strings_for_every_template(template, first, later):
    assert first_turn_text(template, "hi") == first
    assert next_turn_text(template, "hi") == later
    assert not first.endswith(" ")


def test_instruction_template_input_block():
    text = user_turn_text(INSTRUCTION_RESPONSE, "Translate to French", input_text="Good morning")
    assert text == "Instruction: Translate to French\n\nInput: Good morning\n\nResponse:"
    with pytest.raises(ValueError, match="no input block"):
        user_turn_text(QUESTION_ANSWER, "q", input_text="x")


def test_pieces_join_into_the_canonical_conversation():
    t = QUESTION_ANSWER
    pieces = first_turn_text(t, "q1") + answer_text("a1") + next_turn_text(t, "q2")
    assert pieces == "Question: q1\n\nAnswer: a1\n\nQuestion: q2\n\nAnswer:"
    assert conversation_text(t, [("q1", "a1"), ("q2", None)]) == pieces
    assert conversation_text(t, [("q1", "a1"), ("q2", "a2")]) == pieces + " a2"


def test_preamble_goes_first_followed_by_the_separator():
    assert preamble_text("You are helpful.") == "You are helpful.\n\n"
    assert preamble_text(None) == "" and preamble_text("  \r\n ") == ""
    text = first_turn_text(USER_ASSISTANT, "hello", preamble=" You are helpful.\r\n")
    assert text == "You are helpful.\n\nUser: hello\n\nAssistant:"
    whole = conversation_text(USER_ASSISTANT, [("hello", "hi there"), ("bye", None)], preamble="Sys")
    assert whole == "Sys\n\nUser: hello\n\nAssistant: hi there\n\nUser: bye\n\nAssistant:"
    assert whole.startswith(preamble_text("Sys"))


def test_preamble_keeps_paragraphs_but_not_longer_gaps():
    assert preamble_text("a\n\nb\n\n\n\nc") == "a\n\nb\n\nc\n\n"
    assert preamble_text("a\r\n\r\nb") == "a\n\nb\n\n"


@pytest.mark.parametrize(
    "raw,cleaned",
    [
        ("  hello  ", "hello"),
        ("a\r\nb", "a\nb"),
        ("a\rb", "a\nb"),
        ("a\n\nb", "a\nb"),
        ("a\n\n\n\nb", "a\nb"),
        ("a\r\n\r\nb", "a\nb"),
        ("a\n  \n\t\nb", "a\nb"),
        ("a\n\n    indented", "a\n    indented"),
        ("\n\nfirst\nsecond\n\n", "first\nsecond"),
    ],
)
def test_clean_message_rules(raw, cleaned):
    assert clean_message(raw) == cleaned
    assert TURN_SEPARATOR not in clean_message(raw)


@pytest.mark.parametrize("raw", ["", "   ", "\r\n\r\n", "\t\n "])
def test_empty_message_raises(raw):
    with pytest.raises(ValueError, match="empty"):
        clean_message(raw)
    with pytest.raises(ValueError, match="empty"):
        first_turn_text(QUESTION_ANSWER, raw)


def test_turn_text_cleans_the_message():
    assert next_turn_text(QUESTION_ANSWER, " a\r\n\r\nb ") == "\n\nQuestion: a\nb\n\nAnswer:"


def test_templates_registry():
    assert set(TEMPLATES) == {"Question/Answer", "User/Assistant", "Instruction/Response"}
    assert get_template(DEFAULT_TEMPLATE) is QUESTION_ANSWER
    assert all(get_template(name).name == name for name in TEMPLATES)
    with pytest.raises(TypeError):
        TEMPLATES["x"] = QUESTION_ANSWER  # read-only mapping


def test_unknown_template_error_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown prompt template 'Bob/Alice'.*Question/Answer"):
        get_template("Bob/Alice")


def test_find_stop():
    assert find_stop(" The answer is 4.") is None
    assert find_stop(" The answer is 4.\n\nQuestion: more") == len(" The answer is 4.")
    assert find_stop(" line\nline\n\n\n") == len(" line\nline")
    assert find_stop("\n\n") == 0
    assert EOT_ID == 0


def test_stream_safe_length_holds_back_a_possible_separator():
    assert stream_safe_length(" abc") == 4
    assert stream_safe_length(" abc\n") == 4
    assert stream_safe_length(" abc\ndef") == 8
    assert stream_safe_length(" abc\n\nxyz") == 4


def test_separator_rest_completes_a_partially_fed_separator():
    assert separator_rest(" a1") == "\n\n"
    assert separator_rest(" a1\n") == "\n"
    assert separator_rest(" a1\n\n") == ""
    fed = " a1\n"
    assert fed + next_turn_text(QUESTION_ANSWER, "q2", fed_text=fed) == " a1\n\nQuestion: q2\n\nAnswer:"


def test_strip_answer_and_answer_text_round_trip():
    assert strip_answer(" Paris is the capital.") == "Paris is the capital."
    assert strip_answer(" x\n") == "x"
    assert strip_answer("no lead") == "no lead"
    assert strip_answer("  code") == " code"  # only the one leading space the model writes
    assert answer_text(strip_answer(" Paris.")) == " Paris."
    assert answer_text("a\n\nb") == " a\nb" and answer_text("") == ""


def test_conversation_text_rejects_open_turn_in_the_middle_and_no_turns():
    with pytest.raises(ValueError, match="last turn"):
        conversation_text(QUESTION_ANSWER, [("q1", None), ("q2", None)])
    with pytest.raises(ValueError, match="at least one turn"):
        conversation_text(QUESTION_ANSWER, [])
