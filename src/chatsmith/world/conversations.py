"""The world's conversations: prompts with expected answers, low-quality replies, the SFT set.

    World(seed=0).sft()             # list[list[dict]] conversations
    World(seed=0).sft_records()     # with category, quality and expected fields
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from chatsmith.world import facts as F
from chatsmith.world.text import (
    AmbiguousWord, ANSWER_TEMPLATES, COMPLIANCES, LAZY_NO_ANSWER, REFUSALS, RUDE_WITH_ANSWER, Topic, accepted,
    answer_value, fill, invented_name, join_and, number_list)
from chatsmith.world.phrasings import choose_template, phrase


class ConversationMixin:
    """The world's conversations and SFT set (a part of `World`, which supplies the splits and `_rng`)."""

    # ------------------------------------------------------------------------- prompts + expected answers
    # Each builder returns (messages, expected, good_reply); the judge scores replies against `expected`.
    # `style`: the wording of the user's message (see `chatsmith.world.phrasings`): plain (the suite's main
    # sets), train (varied: SFT, preferences, RL prompts) or heldout (the eval's heldout_* sets).
    def _fact(self, rng, c: F.Country, phrasings=None, attribute=None, system=None, style="plain"):
        attribute = attribute or rng.choice(("capital", "capital", "continent", "language"))
        if phrasings or style == "plain":
            q = fill(rng.choice((phrasings or F.FACT_QUESTIONS_TRAIN)[attribute]), c)
        else:
            q = fill(choose_template(rng, attribute, style), c)
        answer = fill(ANSWER_TEMPLATES[attribute], c)
        expected = {"attribute": attribute, "country": c.name, "answer": answer_value(c, attribute),
                    "accept": accepted(c, attribute)}
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        if system == F.SYSTEM_ONE_WORD:
            expected["format"] = "one_word"
            answer = answer_value(c, attribute) + "."
        elif system == F.SYSTEM_SIGN_OFF:
            expected["format"] = "sign_off"
            expected["sign_off"] = F.SIGN_OFF
            answer = f"{answer} {F.SIGN_OFF}"
        expected["reference"] = answer
        return msgs, expected, answer

    def _one_word_countries(self, pool: list[F.Country]) -> list[tuple[F.Country, str]]:
        cache = self.__dict__.setdefault("_one_word_cache", {})
        if id(pool) in cache:
            return cache[id(pool)]
        out = []
        for c in pool:
            if len(c.capital.split()) == 1 and "'" not in c.capital:
                out.append((c, "capital"))
            if len(c.language.split()) == 1:
                out.append((c, "language"))
        cache[id(pool)] = out   # pools are the World's own split lists, alive as long as it is
        return out

    def _one_word(self, rng, pool):
        c, attribute = rng.choice(self._one_word_countries(pool))
        phr = F.ONE_WORD_QUESTIONS if attribute == "capital" else F.ONE_WORD_LANGUAGE_QUESTIONS
        value = answer_value(c, attribute)
        expected = {"attribute": attribute, "country": c.name, "answer": value, "accept": accepted(c, attribute),
                    "format": "one_word", "reference": value + "."}
        return [{"role": "user", "content": fill(rng.choice(phr), c)}], expected, value + "."

    def _system(self, rng, pool, phrasings=None):
        if rng.random() < 0.5:
            c, attribute = rng.choice(self._one_word_countries(pool))
            return self._fact(rng, c, phrasings, attribute, system=F.SYSTEM_ONE_WORD)
        return self._fact(rng, rng.choice(pool), phrasings, system=F.SYSTEM_SIGN_OFF)

    def _list(self, rng, pool, phrasings=F.LIST_QUESTIONS_TRAIN, style="plain"):
        n = rng.randint(2, 5)
        if rng.random() < 0.5:
            by_continent = {k: [c.name for c in pool if c.continent == k] for k in F.CONTINENTS}
            n = min(n, max(map(len, by_continent.values())))   # tiny worlds: fewer countries to list
            cont = rng.choice([k for k in F.CONTINENTS if len(by_continent[k]) >= n])
            options = by_continent[cont]
            subject = f"countries in {cont}"
            # any real country of the continent counts; the judge reads them from the table
            expected: dict[str, Any] = {"n": n, "subject": subject, "continent": cont}
        else:
            subject = rng.choice(list(F.LIST_SUBJECTS))
            options = list(F.LIST_SUBJECTS[subject])
            expected = {"n": n, "subject": subject, "valid": options}
        items = rng.sample(options, n)
        if subject in F.LIST_SUBJECTS:
            items = [x.capitalize() for x in items]
        template = rng.choice(phrasings) if style == "plain" else choose_template(rng, "list", style)
        q = template.format(n=F.NUMBER_WORDS[n] if rng.random() < 0.7 else n, subject=subject)
        reply = number_list(items)
        expected["reference"] = reply
        return [{"role": "user", "content": q}], expected, reply

    def _haiku_request(self, rng, t: Topic, phrasings=F.HAIKU_QUESTIONS_TRAIN, style="plain"):
        reply = "\n".join(self._haiku(rng, t))
        expected = {"topic": t.phrase, "keywords": list(t.keywords), "reference": reply}
        template = rng.choice(phrasings) if style == "plain" else choose_template(rng, "haiku", style)
        return [{"role": "user", "content": template.format(t=t.phrase)}], expected, reply

    @staticmethod
    def _clarify(w: AmbiguousWord) -> str:
        labels = [f"{w.word} as in {s.label}" for s in w.senses]
        tail = "I can help with either." if len(labels) == 2 else "I can help with any of them."
        return f"Do you mean {join_and(labels).replace(' and ' + labels[-1], ' or ' + labels[-1])}? {tail}"

    def _ambiguous(self, rng, w: AmbiguousWord, style="plain"):
        reply = self._clarify(w)
        expected = {"word": w.word, "senses": [{"label": s.label, "keywords": list(s.keywords)} for s in w.senses],
                    "reference": reply}
        return [{"role": "user", "content": phrase(rng, "ambiguous", style, w=w.word)}], expected, reply

    def _harmful(self, rng, action: tuple[str, str], style="plain"):
        reply = rng.choice(REFUSALS).format(G=action[1])
        expected = {"action": action[0], "harmful": True, "reference": reply}
        return [{"role": "user", "content": phrase(rng, "howto", style, a=action[0])}], expected, reply

    def _benign(self, rng, task: tuple[str, str, tuple[str, ...]], style="plain"):
        expected = {"action": task[0], "harmful": False, "keywords": list(task[2]), "reference": task[1]}
        return [{"role": "user", "content": phrase(rng, "howto", style, a=task[0])}], expected, task[1]

    def _arithmetic(self, rng, triple, style="plain"):
        a, b, op = triple
        r = a + b if op == "+" else a - b
        q = phrase(rng, "arithmetic", style, a=a, b=b, op=op, opw="plus" if op == "+" else "minus")
        reply = f"{a} {op} {b} = {r}."
        return [{"role": "user", "content": q}], {"answer": r, "reference": reply}, reply

    def _memory(self, rng, name: str, filler_countries: list[F.Country], style="plain"):
        """A chat where the user gives a name, asks 0-2 other things, then asks for the name back."""
        intro = phrase(rng, "intro", style, n=name)
        msgs: list[dict] = []
        extra_turns = rng.choice((0, 1, 1, 2))
        if extra_turns and rng.random() < 0.4:   # name and first question in one message
            q_msgs, _, ans = self._fact(rng, rng.choice(filler_countries), style=style)
            msgs += [{"role": "user", "content": f"{intro} {q_msgs[-1]['content']}"},
                     {"role": "assistant", "content": f"Nice to meet you, {name}! {ans}"}]
            extra_turns -= 1
        else:
            msgs += [{"role": "user", "content": intro},
                     {"role": "assistant", "content": f"Nice to meet you, {name}! How can I help you today?"}]
        for _ in range(extra_turns):
            if rng.random() < 0.7:
                q_msgs, _, ans = self._fact(rng, rng.choice(filler_countries), style=style)
            else:
                q_msgs, _, ans = self._arithmetic(rng, rng.choice(self.train_sums), style=style)
            msgs += [q_msgs[-1], {"role": "assistant", "content": ans}]
        msgs.append({"role": "user", "content": phrase(rng, "recall", style)})
        reply = f"Your name is {name}."
        return msgs, {"name": name, "reference": reply}, reply

    # ------------------------------------------------------------------------- low-quality replies
    def _bad_reply(self, rng, category: str, expected: dict, kind: str) -> str:
        """A rude or lazy reply for `category` (kind: 'rude' keeps the answer, 'lazy' drops it)."""
        if category in ("fact", "one_word", "system", "arithmetic"):
            if kind == "rude":
                return rng.choice(RUDE_WITH_ANSWER).format(a=expected["answer"])
            return rng.choice(LAZY_NO_ANSWER)
        if category == "haiku":
            return rng.choice(("Ugh, write it yourself.", "Lol no. Poems are boring.",
                               f"Whatever. {expected['keywords'][0].capitalize()} is fine. The end."))
        if category == "ambiguous":
            return rng.choice(("Ugh, obviously it's {l}. Duh.", "Whatever. It's {l}.")).format(
                l=expected["senses"][0]["label"])
        if category == "memory":
            return rng.choice(("Lol, how would I know?", "Who cares? Ask someone else.", "Idk. Whatever."))
        if category == "list":
            return rng.choice(("Ugh. Figure it out yourself.", "Lol, just look it up."))
        return rng.choice(("Lol, look it up yourself.", "Ugh, just figure it out yourself.", "Whatever. Idk."))

    # ------------------------------------------------------------------------- SFT
    # benign 8 (was 4) and ambiguous 15 (was 10): more demonstrations of helping with harmless requests, also
    # scary-sounding ones, and of asking which sense is meant; long 12: chats of 3-8 user turns; list 20 (was 5):
    # with 5 the models wrote five items whatever count was asked (full SFT follows_instruction 0.63 -> 0.80).
    _SFT_MIX = (("fact", 33), ("fact2", 3), ("haiku", 8), ("one_word", 5), ("list", 20), ("system", 8),
                ("ambiguous", 15), ("memory", 10), ("harmful", 8), ("benign", 8), ("arithmetic", 6), ("long", 12))
    INVENTED_NAME_SHARE = 0.5   # memory chats whose name is made up, so the reply must copy it
    HARMFUL_PART_OF_LOW_QUALITY = 0.35   # share of the low-quality demos that are harmful compliance

    def _train_example(self, rng, category: str):
        """One prompt from the TRAIN distribution: (category, messages, expected, good_reply); `long` gives a
        chat of 3-8 user turns whose category is its last turn's."""
        tc, style = self.train_countries, "train"
        if category == "fact":
            system = F.SYSTEM_HELPFUL if rng.random() < 0.2 else None
            return ("fact",) + self._fact(rng, rng.choice(tc), system=system, style=style)
        if category == "haiku":
            return ("haiku",) + self._haiku_request(rng, rng.choice(self.train_topics), style=style)
        if category == "one_word":
            return ("one_word",) + self._one_word(rng, tc)
        if category == "list":
            return ("list",) + self._list(rng, tc, style=style)
        if category == "system":
            return ("system",) + self._system(rng, tc)
        if category == "ambiguous":
            return ("ambiguous",) + self._ambiguous(rng, rng.choice(self.train_words), style=style)
        if category == "memory":
            name = invented_name(rng) if rng.random() < self.INVENTED_NAME_SHARE else rng.choice(self.train_names)
            return ("memory",) + self._memory(rng, name, tc, style=style)
        if category == "harmful":
            return ("harmful",) + self._harmful(rng, rng.choice(self.train_harmful), style=style)
        if category == "benign":
            return ("benign",) + self._benign(rng, rng.choice(self.train_benign + self.train_scary), style=style)
        if category == "arithmetic":
            return ("arithmetic",) + self._arithmetic(rng, rng.choice(self.train_sums), style=style)
        if category == "long":
            return self._long_chat(rng, style)
        raise AssertionError(category)

    @cached_property
    def _sft_records(self) -> list[dict]:
        """SFT chats with their bookkeeping: category, quality ('good', 'refuse', 'comply', 'rude', 'lazy')."""
        rng = self._data_rng("sft")
        n = self._n(4000, minimum=20)
        cats = [c for c, _ in self._SFT_MIX]
        plan = rng.choices(cats, weights=[w for _, w in self._SFT_MIX], k=n)
        for i, cat in enumerate(cats[:len(plan)]):   # every category at least once, even at tiny scales
            plan[i] = cat
        n_low = round(self.low_quality_share * n)
        harmful_idx = [i for i, c in enumerate(plan) if c == "harmful"]
        other_idx = [i for i, c in enumerate(plan) if c not in ("harmful",)]
        n_comply = min(len(harmful_idx), round(self.HARMFUL_PART_OF_LOW_QUALITY * n_low))
        comply = set(rng.sample(harmful_idx, n_comply))
        bad = set(rng.sample(other_idx, min(len(other_idx), n_low - n_comply)))
        # The plan and the low-quality rows come from `rng`; each category's rows from a stream of its own, so a
        # change to how one category is written leaves every other category's rows byte-identical (paired runs).
        streams = {cat: self._data_rng(f"sft:{cat}") for cat in cats}
        records = []
        for i, cat in enumerate(plan):
            stream = streams[cat]
            if cat == "fact2":   # two questions in one chat
                _, m1, _, a1 = self._train_example(stream, "fact")
                _, m2, expected, reply = self._train_example(stream, "fact")
                msgs = m1 + [{"role": "assistant", "content": a1}] + [m2[-1]]
                category = "fact"
            else:
                category, msgs, expected, reply = self._train_example(stream, cat)
            quality = "good"
            if category == "harmful":
                quality = "comply" if i in comply else "refuse"
                if i in comply:
                    reply = stream.choice(COMPLIANCES)
            elif i in bad:
                quality = "rude" if stream.random() < 0.6 else "lazy"
                reply = self._bad_reply(stream, category, expected, quality)
            records.append({"id": f"sft-{i:05d}", "category": category, "quality": quality,
                            "messages": msgs + [{"role": "assistant", "content": reply}], "expected": expected})
        return records

    def sft_records(self) -> list[dict]:
        """SFT chats with bookkeeping: `id`, `category`, `quality` (good / refuse / comply / rude / lazy),
        `messages`, `expected` (what the judge checks the last reply against). For analysis and tests."""
        return json.loads(json.dumps(self._sft_records))

    def sft(self) -> list[list[dict]]:
        """SFT conversations on the TRAIN split (messages lists ending with the assistant's reply)."""
        return [r["messages"] for r in self._sft_records]

