"""Conversations that survive reloads and restarts: an embedded SQLite store in the app's data directory.

Promises:
- `ConversationStore(path)` keeps one row per conversation id (the JSON of conversation_codec, its creation and
  last-change times). `path=None` keeps them in memory only (for tools that embed the app; nothing outlives the
  process). The file is created with its directory; SQLite's write-ahead log keeps readers and the writer apart.
- `save` is durable when it returns (committed); `load` gives None for an unknown or expired id; `delete` forgets
  one; `expire` drops conversations unchanged for longer than `max_age_s` (None: kept forever) and runs by itself at
  most once an hour from `save`. Thread-safe: every call holds one lock around one connection.
- `secret()` is a random key made once per store and kept in it: the page encrypts the conversation id it keeps
  in the browser with it, so a tab finds its conversation again after a server restart.
- `close()` flushes and closes; calls after it raise RuntimeError.
Knows nothing of Gradio, models or the engine.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .chat_service import Conversation
from .conversation_codec import from_json, to_json

STORE_FILE = "conversations.sqlite3"
EXPIRE_EVERY_S = 3600.0


class StoreError(RuntimeError):
    """The store cannot be used where it was asked to live (the message names the place)."""


class ConversationStore:
    def __init__(self, path: Optional[Path | str], max_age_s: Optional[float] = None,
                 clock: Callable[[], float] = time.time):
        self.path = None if path is None else Path(path)
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: Optional[sqlite3.Connection] = sqlite3.connect(
            ":memory:" if self.path is None else str(self.path), check_same_thread=False, isolation_level=None)
        with self._lock:
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, created REAL NOT NULL, "
                             "updated REAL NOT NULL, data TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_urlsafe(32),))
        self._last_expiry = 0.0
        self.expire()

    def __repr__(self) -> str:
        return f"ConversationStore({str(self.path) if self.path else 'in memory'})"

    # ------------------------------------------------------------------------------------ rows
    def save(self, conversation: Conversation) -> None:
        if not conversation.id:
            raise ValueError("a conversation needs an id to be saved")
        now = self._clock()
        data = json.dumps(to_json(conversation), ensure_ascii=False)
        with self._lock:
            self._open().execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET updated = excluded.updated, "
                "data = excluded.data", (conversation.id, now, now, data))
        if now - self._last_expiry >= EXPIRE_EVERY_S:
            self.expire()

    def load(self, conversation_id: str) -> Optional[Conversation]:
        with self._lock:
            row = self._open().execute("SELECT updated, data FROM conversations WHERE id = ?",
                                       (conversation_id,)).fetchone()
        if row is None or self._expired(row[0]):
            return None
        return from_json(json.loads(row[1]))

    def delete(self, conversation_id: str) -> bool:
        with self._lock:
            return self._open().execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    def expire(self) -> int:
        """Drop the conversations older than max_age_s; returns how many went."""
        now = self._clock()
        self._last_expiry = now
        if self.max_age_s is None:
            return 0
        with self._lock:
            return self._open().execute("DELETE FROM conversations WHERE updated < ?",
                                        (now - self.max_age_s,)).rowcount

    def __len__(self) -> int:
        with self._lock:
            return self._open().execute("SELECT COUNT(*) FROM conversations").fetchone()[0]

    def secret(self) -> str:
        with self._lock:
            return self._open().execute("SELECT value FROM meta WHERE name = 'secret'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                if self.path is not None:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------------------------ helpers
    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the conversation store is closed")
        return self._db

    def _expired(self, updated: float) -> bool:
        return self.max_age_s is not None and updated < self._clock() - self.max_age_s
