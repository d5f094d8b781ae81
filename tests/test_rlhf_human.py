"""`chatsmith rlhf --labeler human --feedback DB` at toy size: the first run samples, queues pairs in the
feedback database and stops with a message naming the page and the count; people judge the pairs over
HTTP (`GET /v1/feedback/pairs`, `POST /v1/feedback` with the pair's id, as the page's label mode does);
the same command run again continues the round: the judgments become its comparisons, the reward model
and PPO train, the round finishes.

    python -m pytest tests/test_rlhf_human.py -q
"""

from __future__ import annotations

import json

import httpx
import pytest

from servers import running
from test_ppo import one_thread  # noqa: F401
from test_rlhf import rlhf_cfg


def judge(url: str, pair: dict, choice: str, edited: str | None = None) -> httpx.Response:
    body = {k: pair[k] for k in ("prompt", "response_a", "response_b", "model_a", "model_b")}
    body.update(choice=choice, pair=pair["id"], **({"edited": edited} if edited else {}))
    return httpx.post(url + "/v1/feedback", json=body)


def test_rlhf_waits_for_people_then_continues_the_round(tmp_path, capsys):
    from chatsmith.serve.app import ServedModel, create_app
    from chatsmith.serve.feedback import FeedbackStore
    from chatsmith.train.rlhf import rlhf

    db = tmp_path / "feedback.db"
    cfg = rlhf_cfg(tmp_path, labeler="human", feedback=str(db), rounds=1)
    assert rlhf(cfg) == []                                   # stopped: nothing finished yet
    message = capsys.readouterr().out
    rdir = tmp_path / "rlhf" / "round_1"
    samples = [json.loads(x) for x in (rdir / "samples.jsonl").read_text().splitlines()]
    expected = sum(len(list(dict.fromkeys(t for t in s["responses"] if t.strip()))) // 2 for s in samples)
    assert expected >= 3
    assert f"{expected} of {expected} pairs wait" in message and "#label" in message
    assert f"--feedback {db}" in message and "run this same command again" in message
    assert (rdir / "labels_pending.json").is_file() and not (rdir / "done.json").exists()

    store = FeedbackStore(db)
    with running(create_app([ServedModel.load(cfg.policy, device="cpu", model_id="policy")], feedback=store)) as url:
        listed = httpx.get(url + "/v1/feedback/pairs").json()
        pairs = listed["data"]
        assert listed["pending"] == len(pairs) == expected
        assert all(p["model_a"] == p["model_b"] == cfg.policy and p["response_a"] != p["response_b"] for p in pairs)
        assert judge(url, pairs[0], "a", edited="Paris.").status_code == 200
        assert judge(url, pairs[1], "tie").status_code == 200
        again = judge(url, pairs[1], "b")
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_judged"
        wrong = dict(pairs[2], response_a="something else")
        assert judge(url, wrong, "a").status_code == 400
        assert httpx.get(url + "/v1/feedback/pairs").json()["pending"] == expected - 2

        # run again with pairs still unjudged: it stops again, saying how many are left
        assert rlhf(rlhf_cfg(tmp_path, labeler="human", feedback=str(db), rounds=1)) == []
        assert f"{expected - 2} of {expected} pairs wait" in capsys.readouterr().out
        assert [p["id"] for p in httpx.get(url + "/v1/feedback/pairs").json()["data"]] == \
            [p["id"] for p in pairs[2:]]                     # no second queue of the same round
        for pair in pairs[2:]:
            assert judge(url, pair, "b").status_code == 200
        assert httpx.get(url + "/v1/feedback/pairs").json() == {"object": "list", "data": [], "pending": 0}
    store.close()

    results = rlhf(rlhf_cfg(tmp_path, labeler="human", feedback=str(db), rounds=1))
    assert [r.round for r in results] == [1]
    # a -> 1 comparison, plus the edited reply over both (2); a tie -> none; b -> 1 each
    assert results[0].metrics["comparisons_added"] == 3 + (expected - 2)
    rows = [json.loads(x) for x in (rdir / "new_preferences.jsonl").read_text().splitlines()]
    assert rows[0]["ranked"] == [pairs[0]["response_a"], pairs[0]["response_b"]]
    assert [r["ranked"][0] for r in rows[1:3]] == ["Paris.", "Paris."]
    assert [r["ranked"] for r in rows[3:]] == [[p["response_b"], p["response_a"]] for p in pairs[2:]]
    assert all(r["labeler"] == "human" for r in rows)
    assert (rdir / "done.json").is_file() and (rdir / "ppo").is_dir() and (rdir / "rm").is_dir()
    assert not (rdir / "labels_pending.json").exists()


def test_human_labeler_needs_a_database(tmp_path):
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.rlhf import rlhf

    with pytest.raises(ChatsmithError, match="--labeler human needs --feedback DB"):
        rlhf(rlhf_cfg(tmp_path, labeler="human", rounds=1))
