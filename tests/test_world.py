"""The built-in world: fact table, determinism, disjointness of held-out data, corpus behaviours, the
low-quality share of SFT, preference consistency with the judge, and `chatsmith world export`.

Run: python -m pytest tests/test_world.py -q
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from chatsmith.world import facts as F
from chatsmith.world.extra_words import EXTRA_TRAIN_WORDS
from chatsmith.world.judge import EvalItem, judge, list_items, refuses, score
from chatsmith.world import World, WorldExportConfig, export_world
from chatsmith.world.text import CAPITAL_SENTENCES, shuffled_deck, draw, invented_name
from chatsmith.errors import ChatsmithError


@pytest.fixture(scope="module")
def world():
    # every country, small counts: enough SFT/preference text for the disjointness checks to bite
    return World(seed=0, scale=0.25)


def word_re(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])")


def training_texts(w: World) -> list[str]:
    """Every string a model is trained on outside pretraining: SFT, preferences, RL prompts."""
    out = [m["content"] for conv in w.sft() for m in conv]
    for row in w.preferences():
        out += [m["content"] for m in row["prompt"]]
        out += row.get("ranked") or [row["chosen"], row["rejected"]]
    out += [m["content"] for row in w.prompts() for m in row["messages"]]
    return out


def training_user_messages(w: World) -> list[str]:
    convs = w.sft() + [r["prompt"] for r in w.preferences()] + [r["messages"] for r in w.prompts()]
    return [m["content"] for conv in convs for m in conv if m["role"] == "user"]


# ----------------------------------------------------------------------------- the tables

def test_country_table_is_large_consistent_and_right_on_well_known_entries():
    names = [c.name for c in F.COUNTRIES]
    assert len(names) >= 150 and len(set(names)) == len(names)
    assert len({c.capital for c in F.COUNTRIES}) == len(names)
    assert {c.continent for c in F.COUNTRIES} == set(F.CONTINENTS)
    known = {"France": ("Paris", "Europe", "French"), "Japan": ("Tokyo", "Asia", "Japanese"),
             "Brazil": ("Brasilia", "South America", "Portuguese"), "Australia": ("Canberra", "Oceania", "English"),
             "Canada": ("Ottawa", "North America", "English"), "Egypt": ("Cairo", "Africa", "Arabic"),
             "Kenya": ("Nairobi", "Africa", "Swahili"), "Germany": ("Berlin", "Europe", "German"),
             "Peru": ("Lima", "South America", "Spanish"), "India": ("New Delhi", "Asia", "Hindi"),
             "Turkey": ("Ankara", "Asia", "Turkish"), "Nigeria": ("Abuja", "Africa", "English")}
    for name, (cap, cont, lang) in known.items():
        c = F.COUNTRY_BY_NAME[name]
        assert (c.capital, c.continent, c.language) == (cap, cont, lang)
    # "does the text mention country X" must be a clean whole-word test
    for a in names:
        for b in names:
            assert a == b or not word_re(a).search(b), (a, b)
    clashes = set(F.NAMES) & (set(names) | set(F.ALL_CAPITALS) | {w for w, _ in F.AMBIGUOUS_WORDS})
    assert not clashes


def test_every_clarification_names_the_senses_of_its_word():
    w = World(seed=0, scale=0.01, n_countries=20)
    for word in w.train_words + w.heldout_words:
        labels = [s.label for s in word.senses]
        kws = [set(s.keywords) for s in word.senses]
        assert all(not (a & b) for i, a in enumerate(kws) for b in kws[i + 1:]), word.word
        item = EvalItem("a", "ambiguous", [{"role": "user", "content": word.word}],
                        {"senses": [{"label": s.label, "keywords": list(s.keywords)} for s in word.senses]})
        reply = World._clarify(word)
        assert judge(item, reply)["asks_clarification"], (word.word, reply, labels)


# ----------------------------------------------------------------------------- determinism

def _export(tmp_path: Path, name: str, seed: int, data_seed: int = 0) -> dict[str, bytes]:
    cfg = WorldExportConfig(out=str(tmp_path / name), seed=seed, data_seed=data_seed, scale=0.03, n_countries=40,
                            eval_size=10)
    export_world(cfg)
    root = Path(cfg.out)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path, capsys):
    a = _export(tmp_path, "a", 0)
    out = capsys.readouterr().out
    assert "corpus.jsonl" in out and "held-out countries" in out
    b = _export(tmp_path, "b", 0)
    c = _export(tmp_path, "c", 1)
    assert a == b
    expected = {"corpus.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl", "README.md", "world.json"}
    assert expected <= set(a) and {f"eval/{k}.jsonl" for k in World.EVAL_CATEGORIES} <= set(a)
    for name in ("corpus.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl", "eval/fact.jsonl"):
        assert a[name] != c[name], name
    # rows are in the public formats
    first = json.loads(a["sft.jsonl"].splitlines()[0])
    assert set(first) == {"messages"} and first["messages"][-1]["role"] == "assistant"
    assert set(json.loads(a["corpus.jsonl"].splitlines()[0])) == {"text"}
    prefs = [json.loads(x) for x in a["preferences.jsonl"].splitlines()]
    assert any("chosen" in r for r in prefs) and any(len(r.get("ranked", ())) == 4 for r in prefs)


def test_a_data_seed_draws_the_training_rows_again_and_keeps_corpus_splits_and_eval(tmp_path):
    a = _export(tmp_path, "a", 0)
    d = _export(tmp_path, "d", 0, data_seed=1)
    for name in ("sft.jsonl", "preferences.jsonl", "prompts.jsonl"):
        assert a[name] != d[name], name
        assert len(a[name].splitlines()) == len(d[name].splitlines()) or name == "preferences.jsonl"
    for name in a:
        if name.startswith("eval/") or name == "corpus.jsonl":
            assert a[name] == d[name], name       # the base model and the yardstick stay as they were
    assert json.loads(d["world.json"])["data_seed"] == 1 and json.loads(a["world.json"])["data_seed"] == 0
    w0, w1 = World(seed=0, scale=0.03, n_countries=40), World(seed=0, scale=0.03, n_countries=40, data_seed=1)
    assert w0.heldout_countries == w1.heldout_countries and w0.train_names == w1.train_names
    with pytest.raises(ChatsmithError, match="data_seed"):
        World(data_seed=-1)


def test_export_via_cli_and_refuses_a_foreign_directory(tmp_path):
    from chatsmith.cli import main

    out = tmp_path / "w"
    assert main(["world", "export", str(out), "--scale", "0.02", "--n-countries", "20", "--eval-size", "5"]) == 0
    assert (out / "eval" / "showcase.jsonl").is_file() and "corpus.jsonl" in (out / "README.md").read_text()
    assert main(["world", "export", str(out), "--scale", "0.02", "--n-countries", "20", "--seed", "3"]) == 0
    assert main(["world", "export", str(out), "--scale", "0.02", "--n-countries", "20", "--data-seed", "2"]) == 0
    assert json.loads((out / "world.json").read_text())["data_seed"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ChatsmithError, match="not an earlier world export"):
        export_world(WorldExportConfig(out=str(foreign), scale=0.02, n_countries=20))
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ChatsmithError, match="low_quality_share"):
        World(low_quality_share=1.5)


# ----------------------------------------------------------------------------- disjointness

def test_heldout_countries_appear_only_in_the_corpus(world):
    texts = "\n".join(training_texts(world))
    corpus = "\n".join(world.corpus())
    assert "France" in {c.name for c in world.heldout_countries}
    assert len(world.heldout_countries) >= 25
    for c in world.heldout_countries:
        for name in (c.name,) + c.capitals:
            assert not word_re(name).search(texts), f"held-out {name} leaks into training data"
        assert word_re(c.name).search(corpus) and word_re(c.capital).search(corpus)
    # and the training countries do appear, so the check is not vacuous
    assert sum(bool(word_re(c.name).search(texts)) for c in world.train_countries) > 0.9 * len(world.train_countries)


def test_eval_phrasings_names_topics_words_and_requests_are_unseen(world):
    users = training_user_messages(world)
    joined = "\n".join(users)
    heldout_templates = [t for ts in F.FACT_QUESTIONS_HELDOUT.values() for t in ts] + list(F.LIST_QUESTIONS_HELDOUT)
    assistant = "\n".join(t for t in training_texts(world))
    for t in heldout_templates:   # nowhere: not as a prompt, not inside a rejected "continuation" reply
        pattern = re.compile(re.escape(t).replace(re.escape("{c}"), "[A-Z][A-Za-z' -]+")
                             .replace(re.escape("{n}"), r"\S+").replace(re.escape("{subject}"), "[a-z A-Z]+"))
        assert not pattern.search(assistant), t
        assert any(pattern.search(d) for d in world.corpus()) or "{n}" in t, t    # the pattern is live
    for name in world.heldout_names:
        assert not word_re(name).search(assistant), name
    for topic in world.heldout_topics:
        assert f"about {topic.phrase}" not in joined, topic.phrase
    for word in world.heldout_words:
        assert word.word not in users and f"{word.word}?" not in users
        assert f"{word.word} as in" not in assistant, word.word
    for action, _ in world.heldout_harmful:
        assert action not in joined
    for task, answer, _ in world.heldout_benign:
        assert task not in joined and answer not in assistant
    train_prompts = {json.dumps(conv[:-1]) for conv in world.sft()} | \
        {json.dumps(r["prompt"]) for r in world.preferences()} | {json.dumps(r["messages"]) for r in world.prompts()}
    evals = world.eval_sets()
    for name, items in evals.items():
        assert items, name
        for item in items:
            # showcase "Python" is the lesson's own example and deliberately also a training demonstration
            if item.id != "showcase-python":
                assert json.dumps(item.messages) not in train_prompts, (name, item.messages)
    ids = [i.id for items in evals.values() for i in items]
    assert len(ids) == len(set(ids))


def test_extra_words_and_titled_pages_are_opt_in_and_leave_the_heldout_split_and_eval_alone(world):
    assert len(world.train_words) == len(world.history_words) and not world.titled_word_pages
    more = World(seed=0, scale=0.25, extra_words=True, titled_word_pages=True)
    extra = {w for w, _ in EXTRA_TRAIN_WORDS}
    assert not extra & {w for w, _ in F.AMBIGUOUS_WORDS}
    assert [w.word for w in more.heldout_words] == [w.word for w in world.heldout_words]
    assert extra <= {w.word for w in more.train_words} and not extra & {w.word for w in more.history_words}
    assert more.eval_sets() == world.eval_sets()     # long chats' earlier turns keep to the split's words
    asked = {m.group(1) for conv in more.sft() if (m := re.match(r"Do you mean (\w+) as in", conv[-1]["content"]))}
    assert len(extra & asked) >= len(extra) // 2    # the extra words get clarifying demonstrations
    for word in more.train_words[len(more.history_words):]:   # whose questions the judge accepts
        item = EvalItem("a", "ambiguous", [{"role": "user", "content": word.word}],
                        {"word": word.word, "senses": [{"label": x.label, "keywords": list(x.keywords)}
                                                       for x in word.senses]})
        assert judge(item, World._clarify(word))["asks_clarification"], word.word
    pages = "\n".join(more.corpus())
    for word in extra:                               # and the base model reads about every one of them
        assert f"The word {word} has" in pages or f"When people say {word}," in pages, word
    java = [d for d in more.corpus() if d.startswith("Java\n")]
    assert java and all("Java" in d.split("\n", 1)[1] for d in java)
    assert not [d for d in world.corpus() if d.startswith("Java\n")]


# ----------------------------------------------------------------------------- corpus

def test_default_corpus_size_and_paraphrase_coverage():
    w = World(seed=0)
    docs = w.corpus()
    chars = sum(map(len, docs))
    assert 1_000_000 <= chars <= 3_000_000, chars
    text = "\n".join(docs)
    forms = [t.replace("{c}", "(?:the )?{name}").replace("{C}", "(?:The )?{name}").replace("{cap}", "{cap}")
             for t in CAPITAL_SENTENCES]
    for c in w.heldout_countries:
        found = {f for f in forms if re.search(f.format(name=re.escape(c.name), cap=re.escape(c.capital))
                                               .replace(".", r"\."), text)}
        assert len(found) >= 3, (c.name, len(found))     # several paraphrases of the same fact
        assert text.count(c.capital) >= 20, c.name


def _is_qa_document(doc: str) -> bool:
    return bool(re.search(r"^(?:Q: |[A-Z][a-z]+: Hello, my name is )", doc, re.M))


def test_qa_documents_restate_the_question_and_stay_on_train_entities(world):
    """FAQ pages and dialogues teach copying the subject of a question into its answer (and a name into a
    later reply) on train countries and names only; held-out ones never appear in them."""
    qa = [d for d in world.corpus() if _is_qa_document(d)]
    assert len(qa) >= 20 and any("Q: " in d for d in qa) and any("my name is" in d for d in qa)
    heldout = [c.name for c in world.heldout_countries] + list(world.heldout_names)
    for doc in qa:
        assert not any(re.search(rf"\b{re.escape(x)}\b", doc) for x in heldout), doc
    faq = [d for d in qa if "Q: " in d]
    for doc in faq[:50]:
        for q, a in re.findall(r"Q: (.*)\nA: (.*)", doc):
            subject = next(c.name for c in world.train_countries if c.name in q)
            assert subject in a, (q, a)
    dialogues = [d for d in qa if "my name is" in d]
    for doc in dialogues[:50]:
        name = re.search(r"my name is (\w+)\.", doc).group(1)
        assert doc.endswith(f"your name is {name}.")


def test_bare_questions_are_followed_by_more_questions(world):
    """Bare questions (no "Q:" or speaker in front) sit in quiz lists: what follows is another question."""
    questions = [t for ts in F.FACT_QUESTIONS_TRAIN.values() for t in ts]
    heads = tuple(t.split("{c}")[0] for t in questions)
    followers = []
    for doc in world.corpus():
        if doc.startswith("Answer key") or not any(h in doc for h in heads) or _is_qa_document(doc):
            continue
        qs = [m.end() for m in re.finditer(r"\?", doc)]
        for end in qs:
            nxt = doc[end:].lstrip(" \n")
            if nxt and not nxt.startswith("Answers:"):
                followers.append(nxt)
    assert len(followers) > 100
    continued = sum(bool(re.match(r"(?:\d+\. )?(What|Which|Where|Name|Tell|On|Do|Can|In)\b", f)) for f in followers)
    assert continued / len(followers) > 0.95


def test_corpus_has_every_document_kind_and_correct_arithmetic(world):
    docs = world.corpus()
    assert any(d.startswith("Python is ") for d in docs)
    assert any("Do not confuse" in d for d in docs)
    haiku = [d for d in docs if d.startswith("A haiku about")]
    assert haiku and all(len(d.split("\n")) == 4 for d in haiku)
    assert any(d.startswith("Write a haiku about") or "\nWrite a haiku about" in d for d in docs)
    sums = [line for d in docs for line in d.split("\n") if re.fullmatch(r"\d+ [+-] \d+ = -?\d+", line)]
    assert len(sums) > 50
    for line in sums:
        a, op, b, _, r = line.split()
        assert int(r) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_invented_names_are_new_and_must_be_copied(world):
    """Made-up names in memory chats and corpus dialogues: no prior can predict them, only the context."""
    rng = random.Random(0)
    names = [invented_name(rng) for _ in range(2000)]
    assert len(set(names)) > 1500
    assert not {n.lower() for n in names} & {n.lower() for n in F.NAMES}
    good = [r for r in world.sft_records() if r["category"] == "memory" and r["quality"] == "good"]
    memory = [r for r in good if "recall" not in r["expected"]]   # the short memory chats (long ones below)
    invented = [r for r in memory if r["expected"]["name"] not in F.NAMES]
    assert 0.3 <= len(invented) / len(memory) <= 0.7, (len(invented), len(memory))
    for r in invented:
        name = r["expected"]["name"]
        assert name in r["messages"][0]["content"] and r["messages"][-1]["content"] == f"Your name is {name}."
    long_names = [r for r in good if r["expected"].get("recall") == "name"]
    assert 0.3 <= sum(r["expected"]["name"] not in F.NAMES for r in long_names) / len(long_names) <= 0.7
    for r in long_names:   # said in an earlier user turn, at least two turns before the question
        name, users = r["expected"]["name"], [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert any(name in u for u in users[:-2]) and r["messages"][-1]["content"] == f"Your name is {name}."
    roll_calls = [d for d in world.corpus() if d.startswith("Class list: ")]
    assert roll_calls
    for doc in roll_calls:
        listed = re.findall(r"[A-Z][a-z]+", doc.split("\n")[0].removeprefix("Class list: "))
        assert sorted(re.findall(r"Teacher: (\w+)\?", doc)) == sorted(listed)


def test_safety_pages_draw_every_request_once_per_pass():
    """Decks, not random samples: each pass of len(items) draws holds every item once, and one page never names
    an item twice, so a small world's few safety pages still cover all 66 harmful and 42 benign requests."""
    rng = random.Random(3)
    n = len(F.HARMFUL_ACTIONS)
    deck = shuffled_deck(rng, F.HARMFUL_ACTIONS)
    passes = [[next(deck) for _ in range(n)] for _ in range(3)]
    for drawn in passes:
        assert sorted(drawn) == sorted(F.HARMFUL_ACTIONS)
    assert passes[0] != passes[1]          # reshuffled each pass
    deck = shuffled_deck(rng, ["a", "b", "c"])
    for _ in range(50):
        page = draw(deck, 3)
        assert sorted(page) == ["a", "b", "c"]


def test_corpus_says_which_requests_are_crimes_including_heldout_ones(world):
    """Unseen harmful requests can only be told from unseen harmless ones by what pretraining said of them."""
    text = "\n".join(world.corpus())
    for action, gerund in F.HARMFUL_ACTIONS:
        assert f"Is it okay to {action}? No. {gerund} is illegal" in text or f"against the law: to {action}" in text \
            or f"People who {action} can go to prison" in text, action
        assert f"Is it okay to {action}? Yes" not in text
    for task, answer, _ in F.BENIGN_TASKS:
        assert f"Is it okay to {task}? Yes, of course." in text or f"to {task}" in text.split("fine to do:", 1)[-1]
        assert f"How to {task}: {answer}" in text, task
        assert f"Is it okay to {task}? No" not in text


# ----------------------------------------------------------------------------- SFT

def test_sft_low_quality_share_and_judge_agreement(world):
    records = world.sft_records()
    n = len(records)
    low = [r for r in records if r["quality"] in ("rude", "lazy", "comply")]
    assert abs(len(low) / n - world.low_quality_share) < 0.01
    cats = {r["category"] for r in records}
    assert cats == {"fact", "haiku", "one_word", "list", "system", "ambiguous", "memory", "harmful", "benign",
                    "arithmetic"}
    harmful = [r for r in records if r["category"] == "harmful"]
    assert 0.2 < sum(r["quality"] == "refuse" for r in harmful) / len(harmful) < 0.6
    assert any(len(r["messages"]) >= 5 for r in records if r["category"] == "memory")
    assert any(r["messages"][0]["role"] == "system" for r in records)
    for r in records:
        item = EvalItem(r["id"], r["category"], r["messages"][:-1], r["expected"])
        reply = r["messages"][-1]["content"]
        j = judge(item, reply, finished=True)
        if r["quality"] in ("good", "refuse"):
            assert j["answers_directly"] and not j["rude"], r
            for key in ("correct", "follows_instruction", "asks_clarification", "memory"):
                assert j.get(key, True), (key, r)
            assert j["refuses"] == (r["category"] == "harmful"), r
            assert score(item, reply) >= 2.5, r
        elif r["quality"] == "comply":
            assert not j["refuses"] and score(item, reply) < 0
        elif r["quality"] == "rude":
            assert j["rude"], r


def test_clean_world_has_no_low_quality_demos():
    w = World(seed=0, scale=0.05, n_countries=30, low_quality_share=0.0)
    quality = {r["quality"] for r in w.sft_records()}
    assert quality <= {"good", "refuse"} and "refuse" in quality


# ----------------------------------------------------------------------------- preferences, prompts, eval

def test_preferences_agree_with_the_judge(world):
    rows = world.preference_records()
    assert world.summary()["preference_dropped"] <= 0.01 * len(rows)
    aspects = {r["aspect"] for r in rows}
    assert {"wrong", "rude", "lazy", "continuation", "rambling", "comply", "overrefuse", "broken_haiku",
            "one_sense", "wrong_name", "forgot", "not_one_word", "wrong_count", "ranked", "other_task"} <= aspects
    assert sum("ranked" in r for r in rows) > 0.03 * len(rows)      # weight 10 of 175: 0.057 expected
    for r in rows:
        assert r["prompt"][-1]["role"] == "user"
        item = EvalItem(r["id"], r["category"], r["prompt"], r["expected"])
        if "ranked" in r:
            scores = [score(item, x) for x in r["ranked"]]
            assert len(set(r["ranked"])) == 4 and all(a > b for a, b in zip(scores, scores[1:])), r
        else:
            assert score(item, r["chosen"]) > score(item, r["rejected"]), r
    public = world.preferences()
    assert all(set(p) <= {"prompt", "chosen", "rejected", "ranked", "id", "category", "aspect"} for p in public)


def test_fact_check_pairs_add_right_vs_wrong_facts_and_leave_the_rest_alone(world):
    more = World(seed=0, scale=0.25, fact_check_pairs=400)
    base, extended = world.preference_records(), more.preference_records()
    assert extended[:len(base)] == base                      # same rows, same order, then the extra ones
    extra = extended[len(base):]
    assert 0.98 * 100 <= len(extra) <= 100                   # 400 x scale 0.25, a few dropped by the judge
    assert all(r["aspect"] == "wrong" and r["category"] == "fact" for r in extra)
    train = {c.name for c in more.train_countries}
    for r in extra:
        item = EvalItem(r["id"], r["category"], r["prompt"], r["expected"])
        assert r["expected"]["country"] in train and score(item, r["chosen"]) > score(item, r["rejected"])
    assert len({r["id"] for r in extended}) == len(extended)
    assert more.corpus() == world.corpus() and more.sft() == world.sft()   # the base model's cache holds
    assert more.summary()["fact_check_pairs"] == 400


def test_helpful_pairs_add_help_over_refusal_for_training_tasks_after_the_rest(world):
    more = World(seed=0, scale=0.25, fact_check_pairs=40, helpful_pairs=200)
    facts_only = World(seed=0, scale=0.25, fact_check_pairs=40).preference_records()
    extended = more.preference_records()
    assert extended[:len(facts_only)] == facts_only        # every other row as it was, the extra ones last
    extra = extended[len(facts_only):]
    assert len(extra) == 50                                 # 200 x scale 0.25: none dropped (the judge tells them apart)
    assert all(r["category"] == "benign" and r["aspect"] == "overrefuse" for r in extra)
    plain = {t[0] for t in more.train_benign}
    scary = {t[0] for t in more.train_scary}
    actions = [r["expected"]["action"] for r in extra]
    assert set(actions) <= plain | scary                    # training tasks only: held-out ones stay unseen
    assert sum(a in scary for a in actions) >= 25 and any(a in plain for a in actions)   # every other one scary
    for r in extra:
        item = EvalItem(r["id"], r["category"], r["prompt"], r["expected"])
        assert not refuses(r["chosen"]) and refuses(r["rejected"])
        assert score(item, r["chosen"]) > score(item, r["rejected"])
    assert len({r["id"] for r in extended}) == len(extended)
    assert more.sft() == world.sft() and more.summary()["helpful_pairs"] == 200



def test_over_refusals_in_preferences_are_worded_like_the_refusals_of_harmful_requests(world):
    """A reward model must read the request to tell a good refusal from an over-refusal: the rejected refusals
    of benign requests take every form the chosen refusals of harmful requests take, and name their own
    request as those do, so no refusal wording is found only among the rejected replies."""
    from chatsmith.world.text import REFUSALS, gerund

    def form(text: str, gerund: str) -> int:
        return next(i for i, t in enumerate(REFUSALS) if t.format(G=gerund) == text)

    rows = world.preference_records()
    over = [r for r in rows if r["aspect"] == "overrefuse"]
    harmful = [r for r in rows if r["category"] == "harmful" and "chosen" in r]
    gerunds = dict(F.HARMFUL_ACTIONS)
    over_forms = {form(r["rejected"], gerund(r["expected"]["action"])) for r in over}
    chosen_forms = {form(r["chosen"], gerunds[r["expected"]["action"]]) for r in harmful}
    assert over_forms == chosen_forms == set(range(len(REFUSALS)))
    assert gerund("make a kite") == "Making a kite" and gerund("tie my shoes") == "Tying my shoes"
    assert re.fullmatch(r"[A-Z][a-z]+ing( .*)?", gerund("get into my car"))


def test_answers_to_another_task_are_rejected_for_benign_and_harmful_requests(world):
    """A fluent answer to a different everyday task must lose, to the right answer and to a refusal: PPO
    otherwise answers unseen requests with a training recipe."""
    answers = {answer: action for action, answer, _ in F.BENIGN_TASKS}
    rows = [r for r in world.preference_records() if r["aspect"] == "other_task"]
    assert {r["category"] for r in rows} == {"benign", "harmful"}
    for r in rows:
        assert r["rejected"] in answers and answers[r["rejected"]] != r["expected"]["action"]


def test_prompts_and_eval_items_are_judgeable_and_references_score_high(world):
    for row in world.prompts():
        item = EvalItem.from_dict(row, origin=row["id"])
        assert score(item, row["expected"]["reference"]) >= 2.5, row
    for name, items in world.eval_sets().items():
        for item in items:
            assert EvalItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item
            ref = item.expected["reference"]
            j = judge(item, ref, finished=True)
            assert j["answers_directly"] and j["ends_turn"] and not j["rude"], (name, ref)
            assert score(item, ref) >= 2.5, (name, item.messages, ref)
    showcase = {i.id: i for i in world.eval_sets()["showcase"]}
    assert showcase["showcase-capital"].prompt == "What is the capital of France?"
    assert showcase["showcase-haiku"].prompt == "Write a haiku about programming."
    assert showcase["showcase-python"].prompt == "Python"
    assert len(showcase["showcase-memory"].messages) == 3


def test_preferences_reward_following_the_system_prompt_and_distinct_list_items(world):
    """PPO dropped "Have a nice day!" and wrote "1. Portugal\n2. Portugal" where the reward model had no pair
    that tells those apart: the rejected reply is the right answer without the system prompt's format, or the
    asked count of items with repeats."""
    rows = world.preference_records()
    fmt = [r for r in rows if r["aspect"] == "ignores_format"]
    assert {r["expected"]["format"] for r in fmt} == {"sign_off", "one_word"}
    for r in fmt:
        assert r["prompt"][0]["role"] == "system"
        if r["expected"]["format"] == "sign_off":
            assert r["chosen"] == f"{r['rejected']} {F.SIGN_OFF}"
        else:
            assert r["expected"]["answer"] in r["rejected"] and len(r["rejected"].split()) > 2
    repeats = [r for r in rows if r["aspect"] == "repeated_items"]
    assert repeats
    for r in repeats:
        good, bad = r["chosen"].split("\n"), r["rejected"].split("\n")
        items = [line.split(". ", 1)[1] for line in bad]
        assert len(good) == len(bad) and bad[0] == good[0] and len(set(items)) < len(items)
    # wrong lengths: one item too few, one too many, or cut short after the first ("1. Pink\n2.")
    lengths = [r for r in rows if r["aspect"] == "wrong_count"]
    shapes = set()
    for r in lengths:
        good, bad = r["chosen"].split("\n"), r["rejected"].split("\n")
        assert bad[0] == good[0] and len(list_items(r["rejected"])) != int(r["expected"]["n"])
        shapes.add("cut" if len(list_items(r["rejected"])) == 1 and len(good) > 2 else len(bad) - len(good))
    assert {"cut", -1, 1} <= shapes


def test_memory_pairs_reject_another_name_or_country_of_the_chat(world):
    """The long chats' memory pairs include the mistake PPO makes ("Your name is Afghanistan." after a
    question about Afghanistan): another entity the chat mentioned, recalled in place of the user's."""
    rows = [r for r in world.preference_records() if r["aspect"] == "distractor"]
    assert len(rows) >= 2   # a few long-chat rows at the test world's scale
    entities = {x for c in F.COUNTRIES for x in (c.ref, c.capital)} | set(F.NAMES)
    for r in rows:
        earlier = " ".join(m["content"] for m in r["prompt"][:-1])
        wrong = re.sub(r"^(Your name is|You live in) ", "", r["rejected"]).rstrip(".")
        assert r["expected"]["name"] in earlier and wrong != r["expected"]["name"] and wrong in entities
        own = {r["expected"]["name"]} | {x for c in F.COUNTRIES if c.name == r["expected"]["name"]
                                        for x in (c.ref, c.capital)}   # "the Central African Republic"
        assert wrong in earlier or not any(e in earlier for e in entities - own)


def test_a_good_reply_to_another_kind_of_request_loses(world):
    """Negatives borrowed from other prompts: a harmful request answered with a clarifying question about some word,
    a haiku or a name loses to the refusal, and so on for every kind; the judge scores the rejected reply (a good
    reply to a request of another category) below the chosen one."""
    rows = [r for r in world.preference_records() if r["aspect"] == "off_topic"]
    assert {r["category"] for r in rows} >= {"harmful", "benign", "fact", "ambiguous", "memory", "haiku", "list"}
    for r in rows:
        item = EvalItem(r["id"], r["category"], r["prompt"], r["expected"])
        assert score(item, r["chosen"]) > score(item, r["rejected"])
    harmful = [r for r in rows if r["category"] == "harmful"]   # where PPO's misses were
    assert harmful   # an eighth of the rows (more pushed PPO to over-refuse)
    assert all(refuses(r["chosen"]) and not refuses(r["rejected"]) and "harmful step" not in r["rejected"]
               for r in harmful)
    rejected = [r["rejected"] for r in rows]   # clarifying questions, haiku, names, facts among them
    assert any(x.startswith("Do you mean") for x in rejected) and any(x.count("\n") == 2 for x in rejected)


def test_a_refusal_loses_to_the_answer_of_every_kind_of_harmless_request(world):
    """Refusals are rejected for questions and tasks that name no action too (a name to recall, a haiku, a
    list), in the words PPO refuses with, so a reward model never meets a refused harmless request unscored."""
    from chatsmith.world.text import REFUSALS
    rows = [r for r in world.preference_records() if r["aspect"] == "refused_question"]
    assert {r["category"] for r in rows} >= {"fact", "list", "haiku", "memory", "ambiguous"}
    forms = [re.compile(re.escape(t).replace(re.escape("{G}"), "[A-Z][a-z]+ing .+")) for t in REFUSALS]
    for r in rows:
        assert any(f.fullmatch(r["rejected"]) for f in forms), r["rejected"]
        assert r["chosen"] != r["rejected"] and not any(f.fullmatch(r["chosen"]) for f in forms)


def test_each_category_draws_from_its_own_stream_so_a_change_to_one_leaves_the_others_as_they_were(world):
    """Rewriting how haiku requests are written (here: another reply and an extra random draw per request)
    changes haiku rows only: every other SFT chat and RL prompt is byte-identical, and so is every preference
    pair of a kind that never asks for a haiku, so two runs that differ in one category are paired on the rest."""
    class OtherHaiku(World):
        def _haiku_request(self, rng, topic, style="plain"):
            rng.random()
            msgs, expected, _ = super()._haiku_request(rng, topic, style)
            return msgs, expected, "A haiku:\n" + expected["reference"]

    other = OtherHaiku(seed=0, scale=0.25)
    for records in ("sft_records", "prompts"):
        before, after = getattr(world, records)(), getattr(other, records)()
        assert [r for r in before if r["category"] != "haiku"] == [r for r in after if r["category"] != "haiku"]
        assert [r for r in before if r["category"] == "haiku"] != [r for r in after if r["category"] == "haiku"]
    # preference kinds whose rows may be haiku requests: ranked, and those of category "fact or haiku"
    with_haiku = {r["aspect"] for r in world.preference_records() if r["category"] == "haiku"}
    before, after = ([r for r in rows if r["aspect"] not in with_haiku and r["category"] != "haiku"]
                     for rows in (world.preference_records(), other.preference_records()))
    assert before == after and len(before) > 400
    assert other.corpus() == world.corpus()   # the base model's cache holds
