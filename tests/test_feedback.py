"""Tests for human feedback: the SQLite store, `POST /v1/feedback` on a real server, `chatsmith feedback export`.

    python -m pytest tests/test_feedback.py -q

Covers: a judgment's round trip through the store (WAL, synchronous=FULL), input checks, the route over real
HTTP (auth, bad bodies as OpenAI error JSON, feedback off), the export rules (a, b, tie, both_bad, edited,
identical pairs), the exported file read back as preferences by `load_examples`, and kill -9 of a server
subprocess while judgments are posted: every acknowledged id is in the database.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatsmith.data.formats import load_examples
from chatsmith.serve.app import create_app
from chatsmith.serve.export import ExportSummary, FeedbackExportConfig, export_feedback, judgment_rows
from chatsmith.serve.feedback import FeedbackError, FeedbackStore, Pair, parse_judgment
from servers import free_port, running, tiny_chat_model, wait_for_health

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("feedback") / "chat")


def body(**changes):
    data = {"prompt": PROMPT, "response_a": "4", "response_b": "five", "model_a": "runs/sft",
            "model_b": "runs/ppo", "choice": "a"}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


# ----------------------------------------------------------------------------- the store

def test_store_round_trip(tmp_path):
    path = tmp_path / "fb" / "feedback.db"
    store = FeedbackStore(path)
    first = store.add(parse_judgment(body()))
    second = store.add(parse_judgment(body(choice="both_bad", edited="2+2 is 4.", metadata={"user": "ann"})))
    assert (first, second) == (1, 2)
    store.close()

    again = FeedbackStore(path)          # reopened: what was committed is there
    got = again.judgments()
    assert [j.id for j in got] == [1, 2] and len(again) == 2
    assert got[0].prompt == PROMPT and got[0].response_a == "4" and got[0].response_b == "five"
    assert (got[0].model_a, got[0].model_b, got[0].choice, got[0].edited, got[0].metadata) == \
        ("runs/sft", "runs/ppo", "a", None, None)
    assert got[1].choice == "both_bad" and got[1].edited == "2+2 is 4." and got[1].metadata == {"user": "ann"}
    assert abs(got[1].created - time.time()) < 60
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again.conn.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    again.close()


@pytest.mark.parametrize("changes, param, words", [
    (dict(choice="c"), "choice", "one of a, b, tie, both_bad"),
    (dict(choice=None), "choice", "one of"),
    (dict(prompt=[]), "prompt", "non-empty list"),
    (dict(prompt="hi"), "prompt", "non-empty list"),
    (dict(prompt=[{"role": "robot", "content": "x"}]), "prompt", "prompt[0]"),
    (dict(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), "prompt", "last"),
    (dict(response_a=None), "response_a", "missing"),
    (dict(response_b=3), "response_b", "int"),
    (dict(response_a="  "), "response_a", "empty"),
    (dict(model_b=None), "model_b", "missing"),
    (dict(edited=["x"]), "edited", "string"),
    (dict(metadata=[1]), "metadata", "JSON object"),
    (dict(colour="red"), "colour", "unknown field"),
    (dict(pair="3"), "pair", "positive integer"),
    (dict(pair=0), "pair", "positive integer"),
    (dict(pair=True), "pair", "positive integer"),
])
def test_bad_judgments_are_refused(changes, param, words):
    with pytest.raises(FeedbackError) as info:
        parse_judgment(body(**changes))
    assert info.value.param == param and words in str(info.value)


def test_queued_pairs_and_the_judgments_that_answer_them(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    pairs = [Pair(batch=batch, prompt=PROMPT, response_a="4", response_b=b, model_a="m", model_b="m",
                  metadata={"n": i}) for i, (batch, b) in enumerate([("r1", "five"), ("r1", "3"), ("r2", "22")])]
    assert store.queue_pairs(pairs) == [1, 2, 3]
    assert store.pending_count() == 3 and store.pending_count("r1") == 2
    assert [(p.id, p.response_b, p.metadata) for p in store.pairs("r1")] == [(1, "five", {"n": 0}), (2, "3", {"n": 1})]
    jid = store.add(parse_judgment(body(pair=2, response_b="3", choice="b")))
    assert store.pairs("r1")[1].judgment == jid and store.pending_count("r1") == 1
    assert [p.id for p in store.pairs(pending_only=True)] == [1, 3]
    assert [p.id for p in store.pairs(pending_only=True, limit=1)] == [1]
    assert store.judgments()[0].pair == 2
    for changes, words, status in ((dict(pair=2, response_b="3"), "judged already", 409),
                                   (dict(pair=9), "no such queued pair", 400),
                                   (dict(pair=1, response_b="six"), "not the pair's", 400)):
        with pytest.raises(FeedbackError, match=words) as info:
            store.add(parse_judgment(body(**changes)))
        assert info.value.status == status and info.value.param == "pair"
    assert len(store) == 1 and store.pending_count() == 2          # refused judgments left nothing behind
    store.close()


# ----------------------------------------------------------------------------- the route

@pytest.fixture(scope="module")
def served(model_dir):
    from chatsmith.serve.app import ServedModel

    return ServedModel.load(str(model_dir), device="cpu", max_batch=2, max_queue=4, model_id="tiny")


def test_route_stores_judgments_with_auth(served, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    app = create_app([served], api_key="sesame", max_body_bytes=20_000, feedback=store)
    auth = {"Authorization": "Bearer sesame"}
    with running(app) as url:
        r = httpx.post(url + "/v1/feedback", json=body())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/feedback", json=body(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert len(store) == 0

        r = httpx.post(url + "/v1/feedback", json=body(choice="tie", edited="Four."), headers=auth)
        assert r.status_code == 200 and r.json() == {"id": 1, "object": "feedback"}

        for bad, param in ((body(choice="maybe"), "choice"), (body(prompt=None), "prompt"),
                           ({"x": 1}, "x")):
            r = httpx.post(url + "/v1/feedback", json=bad, headers=auth)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
        r = httpx.post(url + "/v1/feedback", content=b"{not json", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.post(url + "/v1/feedback", content=b"[1]", headers=auth)
        assert r.status_code == 400

        r = httpx.post(url + "/v1/feedback", json=body(choice="b"), headers=auth)   # still serving
        assert r.status_code == 200 and r.json()["id"] == 2
    assert [(j.choice, j.edited) for j in store.judgments()] == [("tie", "Four."), ("b", None)]
    store.close()


def test_route_when_feedback_is_off(served):
    with running(create_app([served])) as url:
        for r in (httpx.post(url + "/v1/feedback", json=body()), httpx.get(url + "/v1/feedback/pairs")):
            assert r.status_code == 404
            err = r.json()["error"]
            assert err["code"] == "feedback_off" and "--feedback" in err["message"]


def test_pairs_route_limit(served, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    store.queue_pairs([Pair(batch="b", prompt=PROMPT, response_a="4", response_b=str(i), model_a="m", model_b="m")
                       for i in range(3)])
    with running(create_app([served], feedback=store)) as url:
        got = httpx.get(url + "/v1/feedback/pairs", params={"limit": 2}).json()
        assert [p["response_b"] for p in got["data"]] == ["0", "1"] and got["pending"] == 3
        for bad in ("0", "x", "501"):
            r = httpx.get(url + "/v1/feedback/pairs", params={"limit": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    store.close()


# ----------------------------------------------------------------------------- export

def test_export_rules():
    def rows(**changes):
        j = parse_judgment(body(**changes))
        j.id = 7
        summary = ExportSummary()
        return [(r["chosen"], r["rejected"]) for r in judgment_rows(j, summary)], summary

    assert rows()[0] == [("4", "five")]
    assert rows(choice="b")[0] == [("five", "4")]
    got, summary = rows(choice="tie")
    assert got == [] and summary.skipped["tie"] == 1
    got, summary = rows(choice="both_bad")
    assert got == [] and summary.skipped["both_bad"] == 1
    got, summary = rows(choice="both_bad", edited="Four.")
    assert got == [("Four.", "4"), ("Four.", "five")] and summary.edited == 1
    got, _ = rows(choice="a", edited="Four.")
    assert got == [("4", "five"), ("Four.", "4"), ("Four.", "five")]
    got, summary = rows(choice="a", edited=" 4 ")           # the edit equals A: that pair says nothing
    assert got == [("4", "five"), (" 4 ", "five")] and summary.skipped["identical"] == 1
    got, summary = rows(response_b="4")
    assert got == [] and summary.skipped["identical"] == 1


def test_export_file_loads_as_preferences(tmp_path, capsys):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for changes in (dict(), dict(choice="b"), dict(choice="tie"), dict(choice="both_bad"),
                    dict(choice="both_bad", edited="Four."), dict(choice="tie", prompt=[PROMPT[1]])):
        store.add(parse_judgment(body(**changes)))
    store.close()
    out = tmp_path / "out" / "prefs.jsonl"
    assert export_feedback(FeedbackExportConfig(db=str(db), out=str(out))) == 0
    line = capsys.readouterr().out
    assert "6 judgments -> 4 preference rows" in line and "2 ties" in line and "2 both bad" in line
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"], r["judgment"]) for r in rows] == \
        [("4", "five", 1), ("five", "4", 2), ("Four.", "4", 5), ("Four.", "five", 5)]
    assert all(r["prompt"] == PROMPT for r in rows)

    loaded = load_examples(out, kind="preference")
    assert loaded.format == "preference" and len(loaded.examples) == 4 and not loaded.bad_rows
    first = loaded.examples[0]
    assert [m["content"] for m in first.prompt] == ["Be brief.", "What is 2+2?"]
    assert first.responses == ["4", "five"]


def test_export_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    missing = subprocess.run([sys.executable, "-m", "chatsmith", "feedback", "export", "--db",
                              str(tmp_path / "nope.db"), "--out", str(tmp_path / "p.jsonl")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert not (tmp_path / "nope.db").exists()
    helped = subprocess.run([sys.executable, "-m", "chatsmith", "feedback", "export", "--help"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "both_bad" in helped.stdout and "edited reply" in helped.stdout


# ----------------------------------------------------------------------------- durability

def test_kill_9_keeps_every_acknowledged_judgment(model_dir, tmp_path):
    db = tmp_path / "feedback.db"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", str(model_dir), "--device", "cpu",
                             "--threads", "1", "--port", str(port), "--feedback", str(db), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url)
        deadline = time.monotonic() + 120

        acknowledged: list[int] = []

        def post_many(worker: int) -> None:
            with httpx.Client(timeout=10) as client:
                for i in range(10_000):
                    try:
                        r = client.post(url + "/v1/feedback", json=body(metadata={"worker": worker, "i": i}))
                    except httpx.HTTPError:
                        return            # the server is gone
                    if r.status_code == 200:
                        acknowledged.append(r.json()["id"])

        with ThreadPoolExecutor(4) as pool:
            for w in range(4):
                pool.submit(post_many, w)
            while len(acknowledged) < 40 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)        # mid-stream: posts are in flight
            proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert len(acknowledged) >= 40
    with sqlite3.connect(db) as conn:                # recovers from the WAL like any reader
        stored = {row[0] for row in conn.execute("SELECT id FROM judgments")}
    assert set(acknowledged) <= stored
