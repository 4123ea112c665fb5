"""WorldTokenizer against the reference TRIE tokenizer of the `rwkv` package (the oracle)."""

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_chat.tokenizer import ACCELERATE_MIN_CHARS, EOT_ID, VOCAB_SIZE, WorldTokenizer, parse_vocab

ref_module = pytest.importorskip("rwkv.rwkv_tokenizer")
REF_VOCAB = Path(ref_module.__file__).with_name("rwkv_vocab_v20230424.txt")
FEW = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CORPUS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "Question: What is RWKV?\n\nAnswer: RWKV is an RNN with transformer-level performance.\n\n",
    "中文测试：今天天气很好，我们去公园散步吧。人工智能",
    "日本語のテキストです。カタカナとひらがな、漢字。",
    "한국어 텍스트입니다. 안녕하세요!",
    "العربية لغة جميلة، مرحبا بالعالم",
    "हिन्दी भाषा में पाठ। नमस्ते दुनिया",
    "Русский текст: съешь же ещё этих мягких французских булок.",
    "Ελληνικά, עברית, ไทย, Tiếng Việt, Türkçe, Ōtsu, naïve café",
    "emoji 😀🦀🌁 ZWJ 👨‍👩‍👧‍👦 👩🏽‍💻 flags 🇺🇸🇯🇵🏳️‍🌈",
    "keycap 1️⃣ #️⃣ skin 👍🏿 math 𝕏𝔸 old 𓀀 cjk-ext 𠀀",
    " " * 1 + "a" + " " * 2 + "b" + " " * 7 + "c" + " " * 129 + "d" + " " * 300,
    "\t\t\t\tx\t \t \n\n\n\n\n\n\n\n\n\ny\n \n \n",
    "line one\r\nline two\r\n\r\n\r\nend\r",
    "".join(chr(c) for c in range(32)) + "\x7f\x80\x9f\xa0\xad",
    "\u2028\u2029\ufeff\u200b\u200d\ufffd\U0010ffff\U000e0001",
    "#" * 200 + "-" * 81 + "=" * 40 + "." * 17,
    "https://example.com/path?query=1&b=2 <html><body>&nbsp;</body></html> {\"json\": [1, 2.5e-3, null]}",
]
EMOJI_3_TOKENS = "🌁"  # b'\xf0\x9f' + b'\x8c' + b'\x81' in the reference


@pytest.fixture(scope="module")
def ref():
    return ref_module.TRIE_TOKENIZER(str(REF_VOCAB))


@pytest.fixture(scope="module")
def tok():
    start = time.perf_counter()
    tokenizer = WorldTokenizer(accelerate=False)
    print(f"\nWorldTokenizer load time: {time.perf_counter() - start:.3f} s")
    return tokenizer


@pytest.fixture(scope="module")
def rust_tok():
    pytest.importorskip("pyrwkv_tokenizer")
    return WorldTokenizer(accelerate=True)


@pytest.fixture(scope="module")
def vocab_texts(ref):
    """Strategy: concatenated vocabulary entries, which stress the longest-match walk more than random text."""
    pieces = []
    for token in ref.idx2token.values():
        try:
            pieces.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    piece = st.sampled_from(tuple(sorted(pieces))) | st.sampled_from(" \n\r\tab")
    return st.lists(piece, max_size=40).map("".join)  # built once: hypothesis caches work per strategy object


def _ref_decode(ref, ids):
    """Reference bytes decoded leniently (the reference decode returns one U+FFFD for any bad byte)."""
    return ref.decodeBytes([i for i in ids if i != EOT_ID]).decode("utf-8", errors="replace")


def _streamed(tok, ids):
    stream = tok.stream_decoder()
    return [stream.push(token_id) for token_id in ids] + [stream.flush()]


# ---- vocabulary ----------------------------------------------------------------------------------


def test_vocabulary_bytes_equal_reference_for_every_id(tok, ref):
    assert sorted(ref.idx2token) == list(range(1, 65530))
    assert [tok.token_bytes(i) for i in range(1, 65530)] == [ref.idx2token[i] for i in range(1, 65530)]
    assert tok.max_token_id == 65529


def test_parser_handles_every_literal_form(tmp_path):
    tokens = [b"\x00", "plain".encode(), "it's".encode(), 'say "hi"'.encode(), "both ' and \"".encode(),
              "back\\slash\t\u2028é中".encode(), b"\xe4\xb8", b"'\\", "  spaced  ".encode(), "中文 ü".encode()]
    lines = []
    for token_id, token in enumerate(tokens, start=1):
        try:
            literal = repr(token.decode("utf-8"))
        except UnicodeDecodeError:
            literal = repr(token)
        lines.append(f"{token_id} {literal} {len(token)}")
    path = tmp_path / "vocab.txt"
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    assert parse_vocab(path) == [b""] + tokens


def test_vocabulary_of_pyrwkv_package_parses_the_same(tok):
    pyrwkv = pytest.importorskip("pyrwkv_tokenizer")
    assert parse_vocab(Path(pyrwkv.__file__).with_name("rwkv_vocab_v20230424.txt")) == parse_vocab(REF_VOCAB)


def test_bad_vocabulary_line_is_a_clear_error(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 '\\x00' 1\n2 'ab' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        parse_vocab(path)


def test_constants(tok):
    assert (tok.vocab_size, tok.eot_id, len(tok)) == (VOCAB_SIZE, EOT_ID, 65536) == (65536, 0, 65536)


def test_known_ids(tok):
    assert tok.encode("\n") == [11]
    assert tok.encode("\n\n") == [261]
    assert tok.encode(" ") == [33]
    assert tok.encode("") == []
    assert tok.token_to_id("\n\n") == 261 and tok.id_to_token(261) == "\n\n"
    assert tok.token_bytes(0) == b"" and tok.token_bytes(256) == b"\xff"


# ---- encoding equals the reference ---------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_encode_equals_reference_on_corpus(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_encode_equals_reference_on_whole_corpus_and_control_chars(tok, ref):
    text = "\n".join(CORPUS) * 3
    assert tok.encode(text) == ref.encode(text)
    for code in range(0x20):
        for text in (chr(code), chr(code) * 5, f"a{chr(code)}b", chr(code) + "\n"):
            assert tok.encode(text) == ref.encode(text)


@FEW
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_random_text_matches_reference_and_round_trips(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text


@FEW
@given(data=st.data())
def test_concatenated_vocabulary_pieces_match_reference(tok, ref, vocab_texts, data):
    text = data.draw(vocab_texts)
    assert tok.encode(text) == ref.encode(text)


@FEW
@given(st.binary(max_size=200))
def test_encode_bytes_matches_reference_on_arbitrary_bytes(tok, ref, data):
    ids = tok.encode_bytes(data)
    assert ids == ref.encodeBytes(data)
    assert tok.decode_bytes(ids) == data


def test_lone_surrogate_is_a_value_error_naming_it(tok):
    with pytest.raises(ValueError, match=r"U\+D800 at position 1"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="errors"):
        tok.encode("x", errors="ignore")


def test_lone_surrogate_with_errors_replace_encodes_replacement_char(tok):
    assert tok.encode("a\ud800b\udfff", errors="replace") == tok.encode("a\ufffdb\ufffd")


# ---- decoding ------------------------------------------------------------------------------------


def test_end_of_text_is_never_shown(tok):
    assert tok.decode([0]) == ""
    assert tok.decode([0] + tok.encode("ab") + [0, 0] + tok.encode("c") + [0]) == "abc"
    assert tok.id_to_token(0) == ""


def test_invalid_bytes_become_one_replacement_each_and_keep_the_rest(tok, ref):
    ids = [256] + tok.encode("hi") + [256, 256] + tok.encode(" there")  # 256 is the byte 0xff
    assert tok.decode(ids) == "\ufffdhi\ufffd\ufffd there"
    assert ref.decode(ids) == "\ufffd"  # the reference loses the whole text


@pytest.mark.parametrize("bad", [-1, 65530, 65535, 10**9])
def test_unknown_ids_are_value_errors(tok, bad):
    with pytest.raises(ValueError, match=f"unknown token id {bad}"):
        tok.decode([11, bad])
    with pytest.raises(ValueError, match="unknown token id"):
        tok.token_bytes(bad)
    with pytest.raises(ValueError, match="unknown token id"):
        tok.stream_decoder().push(bad)


def test_token_to_id_rejects_non_tokens(tok):
    with pytest.raises(ValueError, match="not a single token"):
        tok.token_to_id("\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nq")


@FEW
@given(st.lists(st.integers(0, 65529), max_size=60))
def test_decode_matches_reference_bytes_for_any_ids(tok, ref, ids):
    assert tok.decode(ids) == _ref_decode(ref, ids)


# ---- streaming -----------------------------------------------------------------------------------


def test_stream_holds_back_a_partial_emoji(tok):
    ids = tok.encode(EMOJI_3_TOKENS)
    assert len(ids) == 3
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids] == ["", "", EMOJI_3_TOKENS]
    assert stream.flush() == ""


def test_stream_continues_after_an_invalid_byte(tok):
    stream = tok.stream_decoder()
    assert stream.push(256) == "\ufffd"  # 0xff can never start a character
    assert "".join(stream.push(i) for i in tok.encode("hello")) == "hello"
    truncated = tok.encode(EMOJI_3_TOKENS)[:2] + tok.encode("ok 🌁")
    assert "".join(_streamed(tok, truncated)) == "\ufffdok 🌁" == tok.decode(truncated)


def test_stream_flush_emits_incomplete_tail_and_resets(tok):
    stream = tok.stream_decoder()
    assert stream.push(tok.encode(EMOJI_3_TOKENS)[0]) == ""
    assert stream.pending == b"\xf0\x9f"
    assert stream.push(0) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(tok.encode("a")[0]) == "a"


@pytest.mark.parametrize("text", CORPUS)
def test_stream_equals_full_decode_and_only_grows(tok, text):
    ids = tok.encode(text)
    parts = _streamed(tok, ids)
    assert "".join(parts) == tok.decode(ids) == text
    for k in range(len(ids) + 1):  # after any number of tokens the text so far is final
        assert text.startswith("".join(parts[:k]))


@pytest.fixture(scope="module")
def id_lists(ref):
    """Strategy: id lists rich in the 486 tokens that are not valid UTF-8 alone (partial characters)."""
    invalid = []
    for token_id, token in ref.idx2token.items():
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            invalid.append(token_id)
    assert len(invalid) == 486
    some_id = st.integers(0, 65529) | st.sampled_from(tuple(invalid)) | st.integers(0, 300)
    return st.lists(some_id, max_size=40)


@FEW
@given(data=st.data())
def test_stream_equals_decode_for_any_ids(tok, ref, id_lists, data):
    ids = data.draw(id_lists)
    parts = _streamed(tok, ids)
    full = tok.decode(ids)
    assert "".join(parts) == full == _ref_decode(ref, ids)
    for k in range(len(ids) + 1):
        assert full.startswith("".join(parts[:k]))


# ---- optional Rust accelerator -------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_rust_path_agrees_with_python_path(tok, rust_tok, text):
    assert rust_tok.encode(text) == tok.encode(text)


@FEW
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_rust_path_agrees_on_random_text(tok, rust_tok, text):
    assert rust_tok.encode(text) == tok.encode(text)


def test_rust_path_surrogates_and_unknown_ids_behave_like_python_path(rust_tok):
    with pytest.raises(ValueError, match=r"U\+DC00 at position 0"):
        rust_tok.encode("\udc00")
    assert rust_tok.encode("\ud800", errors="replace") == rust_tok.encode("\ufffd")
    with pytest.raises(ValueError, match="unknown token id"):
        rust_tok.decode([65530])  # never reaches pyrwkv, which would panic


def test_auto_mode_switches_to_rust_for_long_text_with_same_ids(tok, ref):
    pytest.importorskip("pyrwkv_tokenizer")
    auto = WorldTokenizer()
    short = "\n".join(CORPUS)
    assert auto.encode(short) == tok.encode(short) and not auto.accelerated
    long_text = short * (ACCELERATE_MIN_CHARS // len(short) + 1)
    assert auto.encode(long_text) == tok.encode(long_text) == ref.encode(long_text)
    assert auto.accelerated and not tok.accelerated


def test_encode_speed_is_reported(tok, ref):
    text = "\n".join(CORPUS) * 30
    size, count = len(text.encode("utf-8")), len(ref.encode(text))
    for name, encode in [("python", tok.encode), ("reference", ref.encode)]:
        start = time.perf_counter()
        encode(text)
        seconds = time.perf_counter() - start
        print(f"\n{name} encode: {size / seconds / 1e6:.2f} MB/s, {count / seconds / 1e3:.0f}k tokens/s")
