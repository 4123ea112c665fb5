"""The RWKV World tokenizer: text <-> token ids, and incremental decoding for streaming.

Promises:
- `WorldTokenizer.encode` gives exactly the ids of the reference greedy-longest-byte-match TRIE
  tokenizer (`rwkv.rwkv_tokenizer.TRIE_TOKENIZER`) for every string that can be UTF-8 encoded.
- `decode` never shows token 0 (end-of-text) and turns each invalid UTF-8 sequence into one U+FFFD
  while keeping the text around it (the reference turns the whole text into a single U+FFFD).
- `StreamDecoder` emits text as soon as it is complete, holds back a partial multi-byte character,
  and the concatenation of all `push()` results plus `flush()` equals `decode(ids)`.
- Unknown ids (negative or >= 65530) raise ValueError with the offending id.

The vocabulary `rwkv_vocab_v20230424.txt` is read from an installed package (`rwkv` or
`pyrwkv-tokenizer`); nothing is downloaded and nothing is written. Lines look like
`id repr(str|bytes) byte_len` and are parsed without `eval`. When `pyrwkv_tokenizer` (Rust) is
installed it may encode long texts; it is optional and yields the same ids.

This module knows nothing of models, prompts or the UI.
"""

from __future__ import annotations

import codecs
import importlib.util
import operator
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Iterable

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
VOCAB_PACKAGES = ("rwkv", "pyrwkv_tokenizer")  # installed packages that ship VOCAB_FILE, in order of preference
VOCAB_SIZE = 65536  # rows of the model's embedding / logits; ids 65530.. are not in the vocabulary
EOT_ID = 0  # end-of-text; not in the vocabulary file and never shown as text
ACCELERATE_MIN_CHARS = 16384  # shorter texts are encoded in Python: building the Rust tokenizer costs ~0.4 s

_SURROGATE = re.compile("[\ud800-\udfff]")


def find_vocab_file() -> Path:
    """Path of the World vocabulary inside an installed package, without importing the package."""
    for package in VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / VOCAB_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{VOCAB_FILE} not found: install the `rwkv` or `pyrwkv-tokenizer` package, or pass vocab_path"
    )


def _unquote(literal: str) -> bytes:
    """Bytes of one Python literal as written by repr(): 'text', "text", b'bytes' or b"bytes"."""
    if literal[0] == "'" == literal[-1] and "\\" not in literal:
        return literal[1:-1].encode("utf-8")  # the common case, taken first for load speed
    is_bytes = literal.startswith("b")
    body = literal[2:-1] if is_bytes else literal[1:-1]
    if literal[-1] != literal[1 if is_bytes else 0] or literal[-1] not in "'\"":
        raise ValueError(f"not a quoted literal: {literal!r}")
    if is_bytes:
        # repr(bytes) is ASCII with \xNN, \n, \\, \' escapes; unicode_escape maps each to one code point < 256.
        return body.encode("ascii").decode("unicode_escape").encode("latin-1")
    if "\\" in body:
        # Non-Latin-1 characters become \uXXXX escapes so that unicode_escape sees pure Latin-1 input.
        body = body.encode("latin-1", "backslashreplace").decode("unicode_escape")
    return body.encode("utf-8")


def parse_vocab(path: str | os.PathLike) -> list[bytes]:
    """Token bytes by id (index 0 is b'' for end-of-text); checks ids are 1..N in order and byte lengths."""
    with open(path, "rb") as file:
        lines = file.read().decode("utf-8").replace("\r\n", "\n").split("\n")  # repr() escapes \r and \n
    tokens = [b""]
    for line_no, line in enumerate(filter(None, lines), start=1):
        head, _, rest = line.partition(" ")
        literal, _, length = rest.rpartition(" ")
        try:
            token = _unquote(literal)
            valid = int(head) == line_no and len(token) == int(length)
        except (ValueError, IndexError):
            valid = False
        if not valid:
            raise ValueError(f"{path}: bad vocabulary line {line_no}: {line!r}")
        tokens.append(token)
    return tokens


def _prefix_table(tokens: list[bytes]) -> dict[bytes, int]:
    """Every token -> its id, and every proper prefix of a token -> 0 (a trie flattened into one dict)."""
    table: dict[bytes, int] = {}
    for token_id in range(1, len(tokens)):
        token = tokens[token_id]
        table[token] = token_id  # a later duplicate wins, as in the reference
        for end in range(len(token) - 1, 0, -1):
            if token[:end] in table:  # its shorter prefixes are already there too
                break
            table[token[:end]] = 0
    missing = [byte for byte in range(256) if not table.get(bytes([byte]))]
    if missing:
        raise ValueError(f"vocabulary lacks single-byte tokens for bytes {missing[:8]}")
    return table


class WorldTokenizer:
    """RWKV World tokenizer (greedy longest byte match over a 65,529-token vocabulary).

    Text that cannot be UTF-8 encoded (lone surrogates such as "\\ud800") raises ValueError naming the
    character and its position when `errors="strict"` (the default); with `errors="replace"` each
    surrogate is encoded as U+FFFD instead.

    `accelerate` (encoding only; both paths give identical ids): None builds `pyrwkv_tokenizer`, when
    installed, on the first text of at least ACCELERATE_MIN_CHARS characters and uses it from then on;
    True builds it now (ImportError if missing); False never uses it. Decoding is always Python
    (pyrwkv panics on ids >= 65530).
    """

    vocab_size = VOCAB_SIZE
    eot_id = EOT_ID

    def __init__(self, vocab_path: str | os.PathLike | None = None, *, accelerate: bool | None = None):
        self.vocab_path = Path(vocab_path) if vocab_path is not None else find_vocab_file()
        self._tokens = parse_vocab(self.vocab_path)
        self._prefix_ids = _prefix_table(self._tokens)
        self.max_token_id = len(self._tokens) - 1  # 65529 for the World vocabulary
        self._accelerate = accelerate
        self._rust = None
        self._rust_lock = threading.Lock()
        if accelerate:
            self._rust = self._build_rust()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def accelerated(self) -> bool:
        """Whether encode() now runs on pyrwkv_tokenizer."""
        return self._rust is not None

    # ---- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, errors: str = "strict") -> list[int]:
        """Token ids of `text` (no end-of-text appended). `errors`: "strict" or "replace" (see class doc)."""
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', not {errors!r}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            if errors == "strict":
                raise ValueError(
                    f"cannot encode character U+{ord(text[exc.start]):04X} at position {exc.start}: a lone "
                    "surrogate has no UTF-8 form; pass errors='replace' to encode it as U+FFFD"
                ) from None
            text = _SURROGATE.sub("\ufffd", text)
            data = text.encode("utf-8")
        rust = self._rust_for(text)
        return rust.encode(text) if rust is not None else self.encode_bytes(data)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (which need not be valid UTF-8): greedy longest match from the left."""
        lookup = self._prefix_ids.get
        ids: list[int] = []
        start, size = 0, len(data)
        while start < size:
            end = start + 1
            best = lookup(data[start:end])  # every single byte is a token
            stop = end + 1
            while stop <= size:  # walk down the trie while data[start:stop] is a prefix of some token
                token_id = lookup(data[start:stop])
                if token_id is None:
                    break
                if token_id:
                    best, end = token_id, stop
                stop += 1
            ids.append(best)
            start = end
        return ids

    def _rust_for(self, text: str):
        """The Rust tokenizer if it is (or should now be) in use, else None."""
        if self._rust is None and self._accelerate is None and len(text) >= ACCELERATE_MIN_CHARS:
            with self._rust_lock:
                if self._rust is None and self._accelerate is None:
                    try:
                        self._rust = self._build_rust()
                    except (ImportError, ValueError) as exc:  # stay on the Python path
                        self._accelerate = False
                        if not isinstance(exc, ImportError):
                            warnings.warn(str(exc), stacklevel=3)
        return self._rust

    def _build_rust(self):
        from pyrwkv_tokenizer import WorldTokenizer as RustWorldTokenizer

        rust = RustWorldTokenizer(str(self.vocab_path))
        vocab = rust.get_vocab()  # text -> id for the tokens that are valid UTF-8 (plus a placeholder entry)
        for token_id, token in enumerate(self._tokens[1:], start=1):
            try:
                text = token.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if vocab.get(text) != token_id:
                raise ValueError(f"pyrwkv_tokenizer reads {self.vocab_path} differently at id {token_id}")
        if rust.vocab_size() != len(self._tokens):
            raise ValueError(f"pyrwkv_tokenizer reads {rust.vocab_size()} ids from {self.vocab_path}")
        return rust

    # ---- decoding ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token; b'' for end-of-text (0). ValueError for ids outside the vocabulary."""
        index = operator.index(token_id)
        if not 0 <= index < len(self._tokens):
            raise ValueError(
                f"unknown token id {token_id!r}: the vocabulary has ids 0..{len(self._tokens) - 1} (0 = end-of-text)"
            )
        return self._tokens[index]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of `ids`, end-of-text contributing nothing."""
        return b"".join([self.token_bytes(token_id) for token_id in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: end-of-text skipped, each invalid UTF-8 sequence shown as one U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        """Readable form of one token (invalid UTF-8 shown as U+FFFD); '' for end-of-text."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a token given exactly as its text or bytes; ValueError if it is not one token."""
        key = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        token_id = self._prefix_ids.get(key)
        if not token_id:
            raise ValueError(f"{token!r} is not a single token of the World vocabulary")
        return token_id

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one stream of generated ids."""
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one at a time, holding back an incomplete UTF-8 character.

    `push(id)` returns the text completed by that token ('' while a character is split across
    tokens, and for end-of-text); an invalid byte becomes U+FFFD and the text after it flows on.
    `flush()` returns what is held back (an incomplete character becomes U+FFFD) and starts afresh.
    """

    def __init__(self, tokenizer: WorldTokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        """Bytes held back because they may begin a character that later tokens complete."""
        return self._utf8.getstate()[0]
