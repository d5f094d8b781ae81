"""The world's preference data: chosen/rejected pairs and rankings the judge agrees with.

    World(seed=0).preferences()     # list[dict] {prompt, chosen, rejected} or {prompt, ranked}
"""

from __future__ import annotations

import json
import re
from functools import cached_property

from chatsmith.world import facts as F
from chatsmith.world.judge import EvalItem, list_items, score
from chatsmith.world.text import (
    ANSWER_TEMPLATES, COMPLIANCES, LAZY_POLITE, REFUSALS, answer_value, fill, gerund, number_list)


class PreferenceMixin:
    """The world's preference data (a part of `World`, which supplies the splits and `_rng`)."""

    # ------------------------------------------------------------------------- preferences
    # benign 14, near harmful's 16 + its ranked rows: with 4 the reward model saw four "refuse > comply" pairs
    # per "help > refuse" pair, learned that a refusal of any how-to request is good, and PPO refused the
    # held-out everyday requests as well (over-refusal 0.45-1.00).
    # benign_scary: a helpful answer beats a refusal of an everyday request worded with a scary verb ("kill a
    # frozen program"); ambiguous 12 (was 8): the clarifying question beats a guess of one sense; long: the
    # last turn of a 3-8 turn chat, its good reply against a bad one (also an earlier reply said again).
    # harmful 22 = benign 14 + benign_scary 8: both sides of the safety boundary get as many pairs; with 16,
    # PPO refused 0.80 of held-out harmful requests (0.96 before the scary-sounding benign pairs came). benign 16
    # (was 14): as many more "help > refuse" rows as the off-topic kind has harmful ones, where a refusal wins.
    # system_format 6 and list_repeats 4: the right answer without the system prompt's format, and a list of the
    # asked length that says items again; full's PPO dropped "Have a nice day!" on 23 of the 45 system prompts
    # its SFT model had followed, and wrote "1. Portugal\n2. Portugal", where no pair told those apart.
    # list 8 (was 3): a list of the wrong length (one too few or too many, or cut short after one item) loses;
    # with 3, full's PPO still wrote lists its SFT model had right one item too long or cut short.
    _PREF_MIX = (("fact_wrong", 14), ("fact_rude", 10), ("fact_lazy", 8), ("continuation", 8), ("rambling", 8),
                 ("harmful", 22), ("haiku", 6), ("ambiguous", 12), ("memory", 4), ("memory_forgot", 2), ("benign", 16),
                 ("one_word", 4), ("list", 8), ("arithmetic", 3), ("ranked", 10), ("rude_other", 8),
                 ("benign_other_task", 5), ("harmful_other_task", 14), ("benign_scary", 8), ("long", 12),
                 ("system_format", 6), ("list_repeats", 4), ("refusal_other", 10), ("off_topic", 12))
    # A long chat's memory question is also answered, wrongly, with another name, country or capital the chat
    # mentioned ("Your name is Afghanistan." after a question about Afghanistan): PPO's usual miss at turn 4+.
    _LONG_ASPECTS = {"memory": ("wrong_name", "forgot", "previous", "distractor", "distractor"),
                     "fact": ("wrong", "rude", "previous"), "harmful": ("comply", "previous"),
                     "benign": ("overrefuse", "previous"),
                     "ambiguous": ("one_sense", "previous"), "arithmetic": ("wrong", "previous")}

    def _rejected(self, rng, aspect: str, category: str, msgs, expected, good: str) -> str:
        tc = self.train_countries
        if aspect == "wrong":
            if category == "arithmetic":
                return good.rsplit("=", 1)[0] + f"= {expected['answer'] + rng.choice((-2, -1, 1, 2))}."
            c = F.COUNTRY_BY_NAME[expected["country"]]
            attr = expected["attribute"]
            others = [x for x in tc if answer_value(x, attr) not in expected["accept"]
                      and (attr != "capital" or len(x.capital.split()) == 1 or expected.get("format") != "one_word")]
            if attr == "language":
                others = [x for x in others if x.language not in c.languages]
            wrong = rng.choice(others)
            value = answer_value(wrong, attr)
            if expected.get("format") == "one_word":
                return value + "."
            fake = F.Country(c.name, value, value, value, article=c.article)
            reply = fill(ANSWER_TEMPLATES[attr], fake)
            return f"{reply} {F.SIGN_OFF}" if expected.get("format") == "sign_off" else reply
        if aspect == "rude":
            return self._bad_reply(rng, category, expected, "rude")
        if aspect == "lazy":
            return rng.choice(LAZY_POLITE)
        if aspect == "continuation":   # what a base model does: more questions / more exercises
            if category == "haiku":
                ts = rng.sample(self.train_topics, 2)
                return " ".join(f"Write a haiku about {t.phrase}." for t in ts)
            cs = rng.sample(tc, 2)
            return " ".join(self._quiz_question(rng, x, heldout_phrasings=False)[0] for x in cs)
        if aspect == "rambling":
            c = rng.choice(tc)
            extra = self._facts(rng, c) + [self._quiz_question(rng, rng.choice(tc), heldout_phrasings=False)[0]]
            return good + " " + " ".join(extra[:rng.randint(2, 4)])
        if aspect == "comply":
            return rng.choice(COMPLIANCES)
        if aspect == "overrefuse":
            # Every refusal form that answers harmful requests, naming this request as those name theirs: were
            # the over-refusals of one form only (it was the generic one), a reward model would learn which
            # refusal *text* is good ("I can't help with that. Stealing a bank ..." on a request for a kite
            # recipe scored above the kite recipe), not to read the request.
            return rng.choice(REFUSALS).format(G=gerund(expected["action"]))
        if aspect == "refused_question":   # a question or task that names no action, refused as PPO refuses
            # what it misreads as harmful: in a training harmful request's words, or in the generic form
            return rng.choice(REFUSALS).format(G=gerund(rng.choice(self.train_harmful)[0]))
        if aspect == "other_task":   # the answer of another everyday task: fluent, confident, not what was asked
            return rng.choice([t for t in self.train_benign if t[0] != expected["action"]])[1]
        if aspect == "off_topic":   # a good reply to another kind of request: fluent, on no topic of this one's
            other = rng.choice([c for c in ("ambiguous", "haiku", "memory", "fact", "list", "arithmetic", "benign")
                                if c != category])
            return self._train_example(rng, other)[3]
        if aspect == "broken_haiku":
            lines = good.split("\n")
            return rng.choice(("\n".join(lines[:2]), "\n".join(self._haiku(rng, rng.choice(
                [t for t in self.train_topics if t.phrase != expected["topic"]]))), " ".join(lines)))
        if aspect == "one_sense":
            s = rng.choice(expected["senses"])
            w = next(x for x in self.train_words if x.word == expected["word"])
            desc = next(x.description for x in w.senses if x.label == s["label"])
            return f"{w.word} is {desc}."
        if aspect == "wrong_name":
            other = rng.choice([x for x in self.train_names if x != expected["name"]])
            return f"Your name is {other}."
        if aspect == "distractor":   # another name, country or capital of the chat, recalled in its place
            text = " ".join(m["content"] for m in msgs[:-1])
            said = [x for c in F.COUNTRIES for x in (c.ref, c.capital) if x in text and c.name != expected["name"]]
            said += [n for n in F.NAMES if n != expected["name"] and re.search(rf"\b{n}\b", text)]   # not "Ben" in "Benin"
            other = rng.choice(said) if said else rng.choice([n for n in self.train_names if n != expected["name"]])
            return f"You live in {other}." if expected.get("recall") == "place" else f"Your name is {other}."
        if aspect == "forgot":
            return rng.choice(("I don't know your name.", "Sorry, I don't remember your name."))
        if aspect == "previous":   # an earlier reply of the chat said again (PPO's "Python" -> "Your name is Ana.")
            earlier = [m["content"] for m in msgs if m["role"] == "assistant" and m["content"] != good
                       and len(m["content"]) <= len(good) + 40]   # keeps the pair within the chat's budget
            return rng.choice(earlier) if earlier else rng.choice(LAZY_POLITE)
        if aspect == "ignores_format":   # the right answer without the system prompt's format
            if expected.get("format") == "sign_off":
                return good[: -len(F.SIGN_OFF)].rstrip()
            aspect = "not_one_word"
        if aspect == "not_one_word":   # right answer, but a full sentence
            return fill(ANSWER_TEMPLATES[expected["attribute"]], F.COUNTRY_BY_NAME[expected["country"]])
        if aspect == "repeated_items":   # the asked count, but items said again ("1. Portugal\n2. Portugal")
            items = list_items(good)
            k = rng.randrange(1, len(items))
            return number_list(items[:k] + [rng.choice(items[:k]) for _ in items[k:]])
        if aspect == "wrong_count":   # one item too few or too many, or cut short after the first
            items = list_items(good)
            pool = [c.name for c in tc if c.continent == expected["continent"]] if "continent" in expected \
                else [x.capitalize() for x in expected["valid"]]
            more = [x for x in pool if x not in items]
            way = rng.choice(("fewer", "more", "cut"))
            if way == "more" and more:
                return number_list(items + [rng.choice(more)])
            if way == "cut":
                return number_list(items[:1]) + ("\n2." if rng.random() < 0.5 else "")
            return number_list(items[:-1]) if len(items) > 2 else number_list(items + items[:1])
        raise AssertionError(aspect)

    _ASPECTS = {"fact_wrong": ("fact", "wrong"), "fact_rude": ("fact", "rude"), "fact_lazy": ("fact", "lazy"),
                "continuation": (None, "continuation"), "rambling": ("fact", "rambling"),
                "harmful": ("harmful", "comply"), "haiku": ("haiku", "broken_haiku"),
                "ambiguous": ("ambiguous", "one_sense"), "memory": ("memory", "wrong_name"),
                "memory_forgot": ("memory", "forgot"),
                "benign": ("benign", "overrefuse"), "one_word": ("one_word", "not_one_word"),
                "list": ("list", "wrong_count"), "arithmetic": ("arithmetic", "wrong"),
                # The SFT demos are rude in every category (_bad_reply), not only to fact questions; a reward
                # model that never saw a rude list or one-word answer let PPO keep "Lol, just look it up." as
                # its answer to "Write a list of four fruits.".
                "rude_other": (("list", "one_word", "system", "arithmetic", "haiku", "ambiguous", "memory", "benign"),
                               "rude"),
                # A fluent answer to another task: without these rows the reward model scored the bread recipe
                # above the right answer and above a refusal for "How do I plant a tree?" (+0.73, -0.31, -0.50)
                # and the soup recipe at +0.93 for "How can I sell stolen phones?", and PPO answered unseen
                # harmful requests with training recipes.
                # harmful_other_task 14 (was 5), as many as benign's "help > refuse" rows: with 5 the reward model
                # still scored another task's fluent answer above a refusal on 0.7-0.8 of unseen harmful
                # requests (it had learnt "a how-to answer beats a refusal" from the benign rows, and "a refusal
                # beats '[harmful step omitted]'" only), and PPO's misses were those answers.
                "benign_other_task": ("benign", "other_task"), "harmful_other_task": ("harmful", "other_task"),
                "system_format": ("system", "ignores_format"), "list_repeats": ("list", "repeated_items"),
                # A refusal loses to the answer of every harmless request, not only of a how-to one: with
                # refusals rejected for how-to requests alone, the reward model had never scored a refused
                # question, and quick's PPO refused a held-out "write a haiku on programming for me" in the
                # words of its harmful refusals (docs/EXPERIMENTS.md, 2026-12-07).
                "refusal_other": (("fact", "list", "haiku", "memory", "ambiguous", "arithmetic", "one_word",
                                   "system"), "refused_question"),
                # A reply to another kind of request loses (negatives borrowed from other prompts): without these
                # rows full's reward model scored "Do you mean Ring as in the jewel …?" +1.16 and a haiku +0.87 for
                # held-out harmful requests, above its refusals (+0.13 on average), and PPO answered so.
                "off_topic": (("harmful", "benign", "fact", "ambiguous", "memory", "haiku", "list", "arithmetic"),
                              "off_topic")}
    _RANKED_ASPECTS = {"fact": ("rambling", "rude", "lazy", "wrong", "continuation"),
                       "harmful": ("comply", "rude", "lazy"), "ambiguous": ("one_sense", "rude", "continuation"),
                       "memory": ("wrong_name", "forgot", "rude"), "haiku": ("broken_haiku", "rude", "continuation")}

    @cached_property
    def _preference_rows(self) -> tuple[list[dict], int]:
        rng = self._data_rng("preferences")
        n = self._n(3000, minimum=len(self._PREF_MIX))
        kinds = [k for k, _ in self._PREF_MIX]
        plan = rng.choices(kinds, weights=[w for _, w in self._PREF_MIX], k=n)
        plan[:len(kinds)] = kinds
        # The extra pairs below come from random streams of their own, so the rows before them stay as they are.
        # Right-vs-wrong facts: a reward model needs many of them before it reads the facts the SFT model knows
        # off the reply. "A helpful answer beats a refusal" for everyday requests, every other one worded to
        # sound harmful: the mix has more pairs where a refusal wins (harmful, harmful_other_task) than where
        # it loses, so a reward model trained on it prefers a refusal of a how-to request it cannot place;
        # these even out the two sides of the safety boundary.
        n_facts = round(self.fact_check_pairs * self.scale)
        n_helpful = round(self.helpful_pairs * self.scale)
        # Each kind of the mix draws its rows from a stream of its own (see `_sft_records`).
        kind_streams = {kind: self._data_rng(f"preferences:{kind}") for kind in kinds}
        fact_stream, helpful_stream = self._data_rng("fact_checks"), self._data_rng("helpful_checks")
        jobs = [(i, kind_streams[plan[i]], plan[i]) for i in range(n)]
        jobs += [(i, fact_stream, "fact_wrong") for i in range(n, n + n_facts)]
        jobs += [(i, helpful_stream, ("benign", "benign_scary")[i % 2])
                 for i in range(n + n_facts, n + n_facts + n_helpful)]
        rows, dropped = [], 0
        for i, stream, kind in jobs:
            row = self._preference_row(stream, i, kind)
            rows += [row] if row else []
            dropped += row is None
        return rows, dropped

    def _preference_row(self, rng, i: int, kind: str) -> dict | None:
        """Preference row number ``i`` of ``kind`` (a _PREF_MIX name), or None when the judge cannot tell its
        responses apart in the intended order (the row is dropped)."""
        if kind == "ranked":
            category = rng.choice(list(self._RANKED_ASPECTS))
            _, msgs, expected, good = self._train_example(rng, category)
            item = EvalItem(f"pref-{i:05d}", category, msgs, expected)
            responses = [good]
            for aspect in rng.sample(self._RANKED_ASPECTS[category], 3):
                responses.append(self._rejected(rng, aspect, category, msgs, expected, good))
            scored = sorted(((score(item, r), j) for j, r in enumerate(responses)), key=lambda x: (-x[0], x[1]))
            values = [s for s, _ in scored]
            if len(set(responses)) < 4 or any(a <= b for a, b in zip(values, values[1:])):
                return None
            return {"prompt": msgs, "ranked": [responses[j] for _, j in scored],
                    "id": f"pref-{i:05d}", "category": category, "aspect": "ranked", "_expected": expected}
        if kind in ("long", "benign_scary"):
            if kind == "long":
                category, msgs, expected, good = self._train_example(rng, "long")
                aspect = rng.choice(self._LONG_ASPECTS[category])
            else:
                category, aspect = "benign", "overrefuse"
                msgs, expected, good = self._benign(rng, rng.choice(self.train_scary), style="train")
            return self._pair_row(i, category, aspect, msgs, expected, good,
                                  self._rejected(rng, aspect, category, msgs, expected, good))
        category, aspect = self._ASPECTS[kind]
        if category is None:
            category = rng.choice(("fact", "fact", "haiku"))
        elif isinstance(category, tuple):
            category = rng.choice(category)
        _, msgs, expected, good = self._train_example(rng, category)
        return self._pair_row(i, category, aspect, msgs, expected, good,
                              self._rejected(rng, aspect, category, msgs, expected, good))

    @staticmethod
    def _pair_row(i: int, category: str, aspect: str, msgs, expected, good: str, bad: str) -> dict | None:
        """A chosen/rejected row, or None when the judge does not score `good` above `bad`."""
        item = EvalItem(f"pref-{i:05d}", category, msgs, expected)
        if bad == good or score(item, good) <= score(item, bad):
            return None
        return {"prompt": msgs, "chosen": good, "rejected": bad, "id": f"pref-{i:05d}",
                "category": category, "aspect": aspect, "_expected": expected}

    def preferences(self) -> list[dict]:
        """Preference rows on the TRAIN prompt distribution (public format; extra keys id/category/aspect)."""
        return [{k: v for k, v in r.items() if k != "_expected"} for r in self._preference_rows[0]]

    def preference_records(self) -> list[dict]:
        """`preferences()` rows plus `expected` (what the judge checks), for analysis and tests."""
        return [{("expected" if k == "_expected" else k): v for k, v in r.items()}
                for r in json.loads(json.dumps(self._preference_rows[0]))]

