"""Human judgments of two responses, kept in SQLite: what `chatsmith serve --feedback DB` records.

    store = FeedbackStore("runs/feedback.db")
    jid = store.add(parse_judgment({"prompt": [{"role": "user", "content": "Hi"}],
                                    "response_a": "Hello!", "response_b": "what",
                                    "model_a": "runs/sft", "model_b": "runs/ppo", "choice": "a"}))
    for j in store.judgments(): ...

A judgment: the prompt conversation (messages), responses A and B, the model of each, the choice
("a", "b", "tie" or "both_bad"), an optional edited better reply and optional metadata (any JSON object).

Pairs waiting for a judgment (label mode): `chatsmith rlhf --labeler human` queues pairs of its samples
(`queue_pairs(batch, pairs)`, a batch names the run and round); the page lists the pending ones
(`GET /v1/feedback/pairs`) and a judgment that names its `pair` (its id) answers it: the judgment and the
pair's link to it are committed together, a pair is judged once, and its texts must be the judgment's.
The database runs in WAL mode with ``synchronous=FULL``: `add` returns only after the row is committed
and synced, so a judgment acknowledged to a client survives the server being killed.
`chatsmith feedback export` (`chatsmith.serve.export`) turns the judgments into preference rows.

Tests: `python -m pytest tests/test_feedback.py -q`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

__all__ = ["CHOICES", "ROLES", "Judgment", "Pair", "FeedbackError", "parse_judgment", "FeedbackStore",
           "open_existing"]

CHOICES = ("a", "b", "tie", "both_bad")
ROLES = ("system", "user", "assistant")
MAX_TEXT = 200_000        # characters in one response or message; a judgment is a human's reading, not a dump

SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    edited TEXT,
    metadata TEXT
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    batch TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    metadata TEXT,
    judgment INTEGER REFERENCES judgments(id)
);
CREATE INDEX IF NOT EXISTS pairs_batch ON pairs (batch);
"""


class FeedbackError(ChatsmithError):
    """A judgment that cannot be stored; ``param`` names the field at fault, ``status`` the HTTP status
    (409: the pair was judged already)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Judgment:
    """One human comparison of two responses to the same prompt."""

    prompt: list[dict[str, str]]
    response_a: str
    response_b: str
    model_a: str
    model_b: str
    choice: str
    edited: str | None = None
    metadata: dict[str, Any] | None = None
    pair: int | None = None        # the queued pair it answers (label mode), if any
    id: int | None = None          # set once stored
    created: float | None = None   # Unix time, set once stored


@dataclass
class Pair:
    """Two responses to one prompt queued for a person to judge; ``judgment`` is set once judged."""

    batch: str
    prompt: list[dict[str, str]]
    response_a: str
    response_b: str
    model_a: str
    model_b: str
    metadata: dict[str, Any] | None = None
    id: int | None = None
    created: float | None = None
    judgment: int | None = None

    def public(self) -> dict[str, Any]:
        """The JSON the page receives."""
        return {"id": self.id, "batch": self.batch, "prompt": self.prompt, "response_a": self.response_a,
                "response_b": self.response_b, "model_a": self.model_a, "model_b": self.model_b,
                "metadata": self.metadata, "judgment": self.judgment}


def _text(data: dict, name: str, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise FeedbackError(f"field {name!r} must be a string, got {what}", name)
    if required and not value.strip():
        raise FeedbackError(f"field {name!r} is empty", name)
    if len(value) > MAX_TEXT:
        raise FeedbackError(f"field {name!r} is {len(value)} characters; the limit is {MAX_TEXT}", name)
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise FeedbackError("field 'prompt' must be a non-empty list of {\"role\", \"content\"} messages", "prompt")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise FeedbackError(f"prompt[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": string}}",
                                "prompt")
        if len(m["content"]) > MAX_TEXT:
            raise FeedbackError(f"prompt[{i}] is over {MAX_TEXT} characters", "prompt")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise FeedbackError("the prompt's last message must be the user's (the responses answer it)", "prompt")
    return out


def parse_judgment(data: Any) -> Judgment:
    """A checked `Judgment` from a JSON object; raises `FeedbackError` naming the bad field."""
    if not isinstance(data, dict):
        raise FeedbackError(f"a judgment must be a JSON object, got {type(data).__name__}")
    allowed = {"prompt", "response_a", "response_b", "model_a", "model_b", "choice", "edited", "metadata", "pair"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise FeedbackError(f"unknown field {unknown[0]!r}; expected {', '.join(sorted(allowed))}", unknown[0])
    choice = data.get("choice")
    if choice not in CHOICES:
        raise FeedbackError(f"field 'choice' must be one of {', '.join(CHOICES)}, got {json.dumps(choice)[:40]}",
                            "choice")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise FeedbackError(f"field 'metadata' must be a JSON object, got {type(metadata).__name__}", "metadata")
    pair = data.get("pair")
    if pair is not None and (isinstance(pair, bool) or not isinstance(pair, int) or pair < 1):
        raise FeedbackError(f"field 'pair' must be a queued pair's id (a positive integer), got "
                            f"{json.dumps(pair)[:40]}", "pair")
    return Judgment(prompt=_messages(data.get("prompt")), response_a=_text(data, "response_a"),
                    response_b=_text(data, "response_b"), model_a=_text(data, "model_a"),
                    model_b=_text(data, "model_b"), choice=choice, edited=_text(data, "edited", required=False),
                    metadata=metadata, pair=pair)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


class FeedbackStore:
    """The judgments database (created if missing). Safe to share between threads: one connection, a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise ChatsmithError(f"--feedback {self.path}: is a directory; give a database file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            # WAL: readers (export) never block the server; FULL: the WAL is fsynced at every commit, so a
            # committed judgment survives a kill or a power cut, not only a process crash.
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise ChatsmithError(f"--feedback {self.path}: cannot open it as a SQLite database ({exc})") from None
        self.lock = threading.Lock()

    def add(self, judgment: Judgment) -> int:
        """Insert and commit ``judgment`` (and mark the pair it answers judged, in the same transaction);
        returns its id once it is durable. Raises `FeedbackError` for an unknown pair, one judged already
        (status 409) or one whose texts are not the judgment's."""
        created = time.time()
        row = (created, json.dumps(judgment.prompt, ensure_ascii=False), judgment.response_a, judgment.response_b,
               judgment.model_a, judgment.model_b, judgment.choice, judgment.edited,
               _json_or_none(judgment.metadata))
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if judgment.pair is not None:
                    self._check_pair(judgment)
                cur = self.conn.execute(
                    "INSERT INTO judgments (created, prompt, response_a, response_b, model_a, model_b, choice, "
                    "edited, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                jid = int(cur.lastrowid)
                if judgment.pair is not None:
                    self.conn.execute("UPDATE pairs SET judgment = ? WHERE id = ?", (jid, judgment.pair))
                self.conn.execute("COMMIT")          # synced (synchronous=FULL) before it returns
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            judgment.id, judgment.created = jid, created
        return judgment.id

    def _check_pair(self, judgment: Judgment) -> None:
        found = self.conn.execute("SELECT prompt, response_a, response_b, judgment FROM pairs WHERE id = ?",
                                  (judgment.pair,)).fetchone()
        if found is None:
            raise FeedbackError(f"pair {judgment.pair}: no such queued pair", "pair")
        if found[3] is not None:
            raise FeedbackError(f"pair {judgment.pair}: judged already (judgment {found[3]})", "pair", status=409)
        if (json.loads(found[0]), found[1], found[2]) != (judgment.prompt, judgment.response_a, judgment.response_b):
            raise FeedbackError(f"pair {judgment.pair}: the judgment's prompt and responses are not the pair's",
                                "pair")

    def judgments(self) -> list[Judgment]:
        """Every stored judgment, oldest first."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT j.id, j.created, j.prompt, j.response_a, j.response_b, j.model_a, j.model_b, j.choice, "
                "j.edited, j.metadata, p.id FROM judgments j LEFT JOIN pairs p ON p.judgment = j.id "
                "ORDER BY j.id").fetchall()
        return [Judgment(prompt=json.loads(r[2]), response_a=r[3], response_b=r[4], model_a=r[5], model_b=r[6],
                         choice=r[7], edited=r[8], metadata=None if r[9] is None else json.loads(r[9]),
                         pair=r[10], id=r[0], created=r[1]) for r in rows]

    def queue_pairs(self, pairs: list[Pair]) -> list[int]:
        """Queue ``pairs`` for judging (one transaction); returns their ids."""
        created = time.time()
        ids = []
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for p in pairs:
                    cur = self.conn.execute(
                        "INSERT INTO pairs (created, batch, prompt, response_a, response_b, model_a, model_b, "
                        "metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (created, p.batch, json.dumps(p.prompt, ensure_ascii=False), p.response_a, p.response_b,
                         p.model_a, p.model_b, _json_or_none(p.metadata)))
                    p.id, p.created = int(cur.lastrowid), created
                    ids.append(p.id)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return ids

    def pairs(self, batch: str | None = None, pending_only: bool = False, limit: int | None = None) -> list[Pair]:
        """Queued pairs, oldest first: of one ``batch`` (default: all), only those not judged yet if
        ``pending_only``, at most ``limit``."""
        where, args = [], []
        if batch is not None:
            where.append("batch = ?")
            args.append(batch)
        if pending_only:
            where.append("judgment IS NULL")
        sql = ("SELECT id, created, batch, prompt, response_a, response_b, model_a, model_b, metadata, judgment "
               "FROM pairs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.lock:
            rows = self.conn.execute(sql, args).fetchall()
        return [Pair(batch=r[2], prompt=json.loads(r[3]), response_a=r[4], response_b=r[5], model_a=r[6],
                     model_b=r[7], metadata=None if r[8] is None else json.loads(r[8]), id=r[0], created=r[1],
                     judgment=r[9]) for r in rows]

    def pending_count(self, batch: str | None = None) -> int:
        """How many queued pairs (of ``batch``, default all) wait for a judgment."""
        sql = "SELECT COUNT(*) FROM pairs WHERE judgment IS NULL" + (" AND batch = ?" if batch is not None else "")
        with self.lock:
            return int(self.conn.execute(sql, () if batch is None else (batch,)).fetchone()[0])

    def __len__(self) -> int:
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def open_existing(path: str | Path) -> FeedbackStore:
    """The store at ``path``, which must exist (for export: a typo must not create an empty database)."""
    if not Path(path).is_file():
        raise ChatsmithError(f"--db {path}: no such file (the database `chatsmith serve --feedback` writes)")
    return FeedbackStore(path)
