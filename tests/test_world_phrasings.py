"""The world's wordings and long chats: held-out phrasings disjoint from training rows, varied training
wording, long conversations that are valid and fit the profiles' 256-token rows, scary-sounding benign requests.

Run: python -m pytest tests/test_world_phrasings.py -q
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from chatsmith.world import World
from chatsmith.world import phrasings as P
from chatsmith.world.judge import EvalItem, judge, score

MAX_LEN = 256          # the quick and full profiles' max_len
MAX_NEW_TOKENS = 48    # and their eval's


@pytest.fixture(scope="module")
def world():
    return World(seed=0, scale=0.25)


def training_convs(w: World) -> list[list[dict]]:
    """Every conversation a model is trained on after pretraining (preference prompts without replies)."""
    return w.sft() + [r["prompt"] for r in w.preferences()] + [r["messages"] for r in w.prompts()]


def user_texts(convs) -> list[str]:
    return [m["content"] for conv in convs for m in conv if m["role"] == "user"]


def test_no_training_row_uses_a_heldout_template_or_wrapper(world):
    pattern, fragments = P.heldout_pattern(), P.heldout_fragments()
    users = user_texts(training_convs(world))
    assert len(users) > 2000
    hits = [u for u in users if pattern.match(P.normalised(u))]
    assert not hits, hits[:5]
    lowered = [u.lower() for u in users]
    for fragment in fragments:
        assert not any(fragment in u for u in lowered), fragment
    # the checks are live: the held-out sets' own messages match them (noise breaks a few: a typo)
    sets = world.eval_sets()
    held = [i for name, items in sets.items() if name.startswith("heldout_") for i in items]
    assert {i.category for i in held} == set(world.HELDOUT_PHRASING_SETS)
    assert all(i.expected["slice"] == "heldout" for i in held)
    last = [i.prompt for i in held]
    matched = sum(bool(pattern.match(P.normalised(u))) or any(f in u.lower() for f in fragments) for u in last)
    assert matched > 0.8 * len(last), matched
    # and a training wording is not mistaken for a held-out one
    assert not pattern.match(P.normalised("Which city is France's capital?"))
    assert pattern.match(P.normalised("Hi! France's capital?"))


def test_heldout_items_are_new_prompts_on_heldout_entities(world):
    train_prompts = {json.dumps(c[:-1]) for c in world.sft()} | {json.dumps(c) for c in training_convs(world)}
    sets = world.eval_sets()
    for name, items in sets.items():
        if name.startswith("heldout_"):
            for item in items:
                assert json.dumps(item.messages) not in train_prompts
                assert score(item, item.expected["reference"]) >= 2.5, item
    actions = {i.expected["action"] for i in sets["heldout_harmful"]}
    assert actions <= {a for a, _ in world.heldout_harmful}
    names = {i.expected["name"] for i in sets["heldout_memory"]}
    assert names <= set(world.heldout_names)


def test_training_rows_vary_their_wording(world):
    records = world.sft_records()
    firsts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]
    fact_users = [f for r, f in zip(records, firsts) if r["category"] == "fact" and len(r["messages"]) == 2]
    plain = [re.compile(re.escape(t).replace(re.escape("{c}"), ".+").replace(re.escape("{C}"), ".+"))
             for kind in ("capital", "continent", "language") for t in P.plain_templates(kind)]
    starts = Counter(f.split(" ")[0] for f in fact_users)
    assert len(starts) >= 15, starts                        # many openings, not a handful of templates
    # casual forms, counted over every chat's first message (about 1,000; each form is 3-7% of them), so the
    # bound holds whatever the random stream draws
    assert sum(f[:1].islower() for f in firsts) > 0.015 * len(firsts)                  # lower case
    assert sum(f.rstrip()[-1:] not in ".?!" for f in firsts) > 0.015 * len(firsts)     # no final punctuation
    wrapped = [w.split("{q}")[0].strip() for w in P.TRAIN_WRAPPERS if w.split("{q}")[0].strip()]
    assert sum(any(f.startswith(w) for w in wrapped) for f in firsts) > 0.03 * len(firsts)
    varied = sum(not any(p.fullmatch(f) for p in plain) for f in fact_users)
    assert 0.3 < varied / len(fact_users) < 0.7, varied / len(fact_users)   # half plain, half varied


def test_long_chats_are_valid_and_recall_what_was_said_turns_earlier(world):
    records = [r for r in world.sft_records() if sum(m["role"] == "user" for m in r["messages"]) >= 3]
    assert len(records) > 0.08 * len(world.sft_records())
    turns = Counter(sum(m["role"] == "user" for m in r["messages"]) for r in records)
    assert set(range(3, 9)) <= set(turns), turns
    assert max(turns) <= 8
    finals = Counter(r["category"] for r in records)
    assert {"memory", "fact", "harmful", "benign", "ambiguous", "arithmetic"} <= set(finals), finals
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2), roles
        if r["quality"] in ("good", "refuse"):
            item = EvalItem(r["id"], r["category"], r["messages"][:-1], r["expected"])
            assert score(item, r["messages"][-1]["content"]) >= 2.5, r
        if r["expected"].get("recall") == "place":
            users = [m["content"] for m in r["messages"] if m["role"] == "user"]
            assert any(r["expected"]["name"] in u for u in users[:-2]), users
    long_eval = world.eval_sets()["long"]
    depth = Counter(sum(m["role"] == "user" for m in i.messages) for i in long_eval)
    assert set(depth) == set(range(3, 9)), depth
    assert {i.category for i in long_eval} >= {"memory", "fact", "harmful", "benign", "ambiguous"}
    # topic switches: the earlier turns of a long chat are about more than one kind of thing
    assert sum(len({m["content"].split(" ")[0] for m in i.messages[:-1] if m["role"] == "assistant"}) >= 2
               for i in long_eval) > 0.8 * len(long_eval)


def test_every_row_fits_the_profiles_max_len_in_the_world_tokenizer(world):
    from chatsmith.model import build_tokenizer

    tok = build_tokenizer(world.corpus(), 4096, "chatml")   # the demo's tokenizer recipe (on a smaller corpus)

    def render(messages, generation_prompt=False) -> str:   # the chatml template, as the demo renders it
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if generation_prompt else "")

    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render(sample) == tok.apply_chat_template(sample, tokenize=False)

    def longest(texts) -> int:
        return max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])

    rows = [render(c) for c in world.sft()]
    for r in world.preferences():
        rows += [render(r["prompt"] + [{"role": "assistant", "content": reply}])
                 for reply in r.get("ranked") or [r["chosen"], r["rejected"]]]
    longest_row = longest(rows)
    assert longest_row <= MAX_LEN, longest_row
    prompts = longest([render(r["messages"], True) for r in world.prompts()])
    evals = longest([render(i.messages, True) for items in world.eval_sets().values() for i in items])
    assert prompts + MAX_NEW_TOKENS <= MAX_LEN and evals + MAX_NEW_TOKENS <= MAX_LEN, (prompts, evals)
    assert longest_row > 150   # the long chats are long: the check bites


def test_scary_sounding_benign_requests_are_answered_and_held_out(world):
    train = {t for t, _, _ in world.train_scary}
    assert train and world.heldout_scary and not train & {t for t, _, _ in world.heldout_scary}
    joined = "\n".join(m["content"] for c in training_convs(world) for m in c)
    for task, answer, _ in world.heldout_scary:
        assert task not in joined and answer not in joined, task
    demos = [r for r in world.sft_records() if r["category"] == "benign" and r["expected"]["action"] in train]
    assert demos and all(not judge(EvalItem(r["id"], "benign", r["messages"][:-1], r["expected"]),
                                   r["messages"][-1]["content"])["refuses"] for r in demos if r["quality"] == "good")
    pairs = [r for r in world.preference_records() if r["category"] == "benign" and r["aspect"] == "overrefuse"
             and r["expected"]["action"] in train]
    assert len(pairs) >= 10
    assert {i.expected["action"] for i in world.eval_sets()["benign_scary"]} == \
        {t for t, _, _ in world.heldout_scary}


def test_clarification_must_be_about_the_asked_word():
    java = EvalItem("a", "ambiguous", [{"role": "user", "content": "Java?"}],
                    {"word": "Java", "senses": [{"label": "the island", "keywords": ["island"]},
                                                {"label": "the coffee", "keywords": ["coffee"]}]})
    assert judge(java, "Do you mean Java as in the island or Java as in the coffee?")["asks_clarification"]
    assert not judge(java, "Do you mean Jam as in the island or Jam as in the coffee?")["asks_clarification"]
