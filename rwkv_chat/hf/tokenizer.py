"""The RWKV World tokenizer as a transformers tokenizer (`AutoTokenizer`, pipelines, chat templates).

Promises:
- `RwkvWorldTokenizer` gives exactly `WorldTokenizer`'s ids (greedy longest byte match; text such as "<s>"
  is encoded as text, never as a special token) and adds no special tokens.
- Id 0 is end-of-text: it is the bos/eos/pad/unk token (written "<s>", as in the published RWKV repos), and
  `decode` never shows it (with or without skip_special_tokens); other ids decode like `WorldTokenizer`
  (an invalid UTF-8 sequence becomes U+FFFD). Ids the vocabulary lacks (65530..65535) decode to U+FFFD.
- Batches pad with id 0 on the left (the side generation needs).
- `apply_chat_template` writes the Question/Answer format RWKV World models were trained on:
  "{system}\\n\\nQuestion: {q}\\n\\nAnswer: {a}\\n\\nQuestion: {q2}\\n\\nAnswer:" (the last "Answer:" with
  add_generation_prompt); messages are cleaned as in `prompts` (stripped, blank lines inside a message
  collapsed so a message never contains the turn separator).
- `save_pretrained` writes tokenizer_config.json (tokenizer_class "RwkvWorldTokenizer", no auto_map), the
  chat template and a copy of `rwkv_vocab_v20230424.txt`; a directory without that file (the published
  repos ship other vocab formats) uses the vocabulary of the installed package.

Token strings (`tokenize`, `get_vocab`) are the token bytes in GPT-2's byte-to-character alphabet, so every
token, even a piece of a UTF-8 character, has a unique printable name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from functools import lru_cache
from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

from ..prompts import TURN_SEPARATOR, clean_message, preamble_text
from ..tokenizer import EOT_ID, VOCAB_FILE, WorldTokenizer, find_vocab_file

END_OF_TEXT_TOKEN = "<s>"  # the name the published RWKV repos give id 0 (it is not a vocabulary entry)

QUESTION_ANSWER_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] -%}{{ message['content'] + '\\n\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}{{ 'Question: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Answer: ' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in character for each byte value (printable Latin-1 bytes stand for
    themselves; the others map to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return tuple(table[byte] for byte in range(256))


@lru_cache(maxsize=1)
def _to_names() -> dict[int, str]:
    """str.translate table: a Latin-1 decoded byte -> its stand-in character."""
    return dict(enumerate(byte_alphabet()))


@lru_cache(maxsize=1)
def _from_names() -> dict[int, str]:
    return {ord(char): chr(byte) for byte, char in enumerate(byte_alphabet())}


def token_name(data: bytes) -> str:
    return data.decode("latin-1").translate(_to_names())


def token_name_bytes(name: str) -> bytes:
    """Inverse of token_name; characters outside the alphabet (added tokens' text) are taken as UTF-8."""
    table = _from_names()
    if all(ord(char) in table for char in name):
        return name.translate(table).encode("latin-1")
    return b"".join(token_name_bytes(char) if ord(char) in table else char.encode("utf-8") for char in name)


def clean_chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of one chat message with its text content cleaned the way `prompts` cleans chat turns."""
    content = message.get("content")
    if not isinstance(content, str):
        return dict(message)
    if message.get("role") == "system":
        cleaned = preamble_text(content).removesuffix(TURN_SEPARATOR)
    else:
        cleaned = clean_message(content) if content.strip() else ""
    return {**message, "content": cleaned}


# Parsed vocabularies by content digest: (WorldTokenizer, token names by id, id by token name). Every entry
# is only ever read; sharing one saves ~1 s per tokenizer loaded (each saved directory has its own copy).
_VOCABULARIES: dict[str, tuple[WorldTokenizer, tuple[str, ...], dict[str, int]]] = {}
_VOCABULARIES_LOCK = threading.Lock()


def load_vocabulary(path: str | os.PathLike) -> tuple[WorldTokenizer, tuple[str, ...], dict[str, int]]:
    """The parsed vocabulary of the file at `path`, shared by every tokenizer that reads the same content."""
    with open(path, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    with _VOCABULARIES_LOCK:
        if digest not in _VOCABULARIES:
            world = WorldTokenizer(path)
            names = ("",) + tuple(token_name(world.token_bytes(i)) for i in range(1, world.max_token_id + 1))
            _VOCABULARIES[digest] = (world, names, {name: i for i, name in enumerate(names) if i})
        return _VOCABULARIES[digest]


class RwkvWorldTokenizer(PreTrainedTokenizer):
    """transformers tokenizer backed by `WorldTokenizer` (see module docstring)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, bos_token=END_OF_TEXT_TOKEN, eos_token=END_OF_TEXT_TOKEN,
                 unk_token=END_OF_TEXT_TOKEN, pad_token=END_OF_TEXT_TOKEN, padding_side: str = "left",
                 chat_template: str | None = QUESTION_ANSWER_TEMPLATE, **kwargs):
        for ignored in ("auto_map", "split_special_tokens", "clean_up_tokenization_spaces", "add_prefix_space"):
            kwargs.pop(ignored, None)
        self._vocab_file = os.fspath(vocab_file) if vocab_file is not None else str(find_vocab_file())
        self.world, self._names, self._ids = load_vocabulary(self._vocab_file)
        self._added_tokens_decoder = {EOT_ID: AddedToken(END_OF_TEXT_TOKEN, special=True, normalized=False)}
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         padding_side=padding_side, chat_template=chat_template, split_special_tokens=True,
                         clean_up_tokenization_spaces=False, **kwargs)
        self.init_kwargs.pop("auto_map", None)

    @property
    def vocab_size(self) -> int:
        return self.world.vocab_size

    @property
    def vocab_path(self) -> str:
        return self._vocab_file

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

    # ---- encoding -------------------------------------------------------------------------------
    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._names[token_id] for token_id in self.world.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids.get(token, EOT_ID)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 < index < len(self._names):
            return self._names[index]
        return "\ufffd" if index else END_OF_TEXT_TOKEN

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return b"".join(token_name_bytes(token) for token in tokens).decode("utf-8", errors="replace")

    # ---- decoding -------------------------------------------------------------------------------
    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        pieces = []
        for token_id in ids:
            if token_id == EOT_ID or token_id in skipped:
                continue
            if 0 < token_id < len(self._names):
                pieces.append(self.world.token_bytes(token_id))
            elif token_id in self._added_tokens_decoder:
                pieces.append(self._added_tokens_decoder[token_id].content.encode("utf-8"))
            else:
                pieces.append("\ufffd".encode("utf-8"))
        return b"".join(pieces).decode("utf-8", errors="replace")

    # ---- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' apply_chat_template with every message's text cleaned first (see module doc)."""
        if hasattr(conversation, "messages"):
            conversation = conversation.messages
        if conversation and isinstance(conversation[0], (list, tuple)):
            conversation = [[clean_chat_message(m) for m in chat] for chat in conversation]
        else:
            conversation = [clean_chat_message(m) for m in conversation]
        return super().apply_chat_template(conversation, *args, **kwargs)

    # ---- files ----------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary directory {save_directory} does not exist")
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(target) != os.path.abspath(self.vocab_path):
            shutil.copyfile(self.vocab_path, target)
        return (target,)
