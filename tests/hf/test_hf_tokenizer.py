"""RwkvWorldTokenizer (transformers) against the reference World tokenizer, and its files and chat template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_helpers import reference_tokenizer, register_hf

register_hf()

from transformers import AutoTokenizer  # noqa: E402

from rwkv_chat.hf.tokenizer import RwkvWorldTokenizer  # noqa: E402
from rwkv_chat.tokenizer import find_vocab_file  # noqa: E402

TEXTS = [
    "Hello world, this is RWKV.",
    "Question: What is 2+2?\n\nAnswer:",
    "北京的旅游景点 and 東京ではどこを訪れるべきですか？",
    "emoji 🦜🔥 mixed\twith tabs\r\nand CRLF",
    "<s> is text here, not a special token </s>",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def tokenizer() -> RwkvWorldTokenizer:
    return RwkvWorldTokenizer()


@pytest.fixture(scope="module")
def reference():
    return reference_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_the_reference_tokenizer(tokenizer, reference, text):
    ids = tokenizer(text)["input_ids"]
    assert ids == reference.encode(text)
    assert tokenizer.encode(text) == ids  # no special tokens added
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) == ids


def test_end_of_text_is_id_zero_and_never_shown(tokenizer, reference):
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    ids = reference.encode("first\n\nsecond")
    for skip in (False, True):
        assert tokenizer.decode([0, *ids, 0], skip_special_tokens=skip) == "first\n\nsecond"
    assert tokenizer.batch_decode([[0, *ids], ids]) == ["first\n\nsecond"] * 2


def test_split_characters_and_unknown_ids_decode_like_the_world_tokenizer(tokenizer, reference):
    parrot = reference.encode("🦜")
    assert len(parrot) > 1  # one character spread over several tokens
    assert tokenizer.decode(parrot) == "🦜"
    assert tokenizer.decode(parrot[:1]) == "\ufffd"
    assert tokenizer.decode([65530, *reference.encode("ok")]) == "\ufffdok"


def test_batch_pads_on_the_left_with_id_zero(tokenizer, reference):
    batch = tokenizer(["a much longer first text", "short"], padding=True, return_tensors="pt")
    short = reference.encode("short")
    width = batch.input_ids.shape[1]
    assert batch.input_ids[1].tolist() == [0] * (width - len(short)) + short
    assert batch.attention_mask[1].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch.attention_mask[0].tolist() == [1] * width


def test_chat_template_writes_question_answer_turns(tokenizer):
    messages = [
        {"role": "system", "content": "  You are a helpful assistant.  "},
        {"role": "user", "content": "Hi!\r\n\r\nHow are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "What is RWKV?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("You are a helpful assistant.\n\nQuestion: Hi!\nHow are you?\n\nAnswer: Fine, thanks.\n\n"
                    "Question: What is RWKV?\n\nAnswer:")
    closed = tokenizer.apply_chat_template(messages[1:3], tokenize=False)
    assert closed == "Question: Hi!\nHow are you?\n\nAnswer: Fine, thanks.\n\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.encode(text)


def test_save_and_reload_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "RwkvWorldTokenizer" and "auto_map" not in config
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == find_vocab_file().read_bytes()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is RwkvWorldTokenizer
    assert reloaded.vocab_path == str(tmp_path / "rwkv_vocab_v20230424.txt")
    assert reloaded(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert reloaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                        add_generation_prompt=True) == "Question: x\n\nAnswer:"


@pytest.mark.parametrize("version, flavor", [("4", None), ("5.2", "world"), ("5.2", "eagle")])
def test_published_tokenizer_configs_load_without_remote_code(make_checkpoint, reference, tmp_path, version,
                                                              flavor):
    """RWKVWorldTokenizer (rwkv-4-world, Eagle) and Rwkv5Tokenizer (rwkv-5-world) configs with auto_map."""
    options = {"flavor": flavor} if flavor else {}
    checkpoint = make_checkpoint(version, layout="hf", **options)
    published = json.loads((checkpoint.path / "tokenizer_config.json").read_text())
    assert "auto_map" in published
    loaded = AutoTokenizer.from_pretrained(checkpoint.path)
    assert type(loaded) is RwkvWorldTokenizer
    assert loaded(TEXTS[2])["input_ids"] == reference.encode(TEXTS[2])
    loaded.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


def test_registering_does_not_import_transformers():
    """What `import rwkv_chat` runs must not import transformers (the module is loaded on its own, without
    the package and torch, to keep the check fast)."""
    import rwkv_chat.hf.register as module

    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('probe', {module.__file__!r}); "
            "probe = importlib.util.module_from_spec(spec); spec.loader.exec_module(probe); "
            "probe.register_when_transformers_loads(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')), "
            "type(sys.meta_path[0]).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "_AfterImportHook"]
