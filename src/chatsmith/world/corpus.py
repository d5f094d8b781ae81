"""The world's pretraining corpus: documents in many styles stating every fact in paraphrases.

    World(seed=0).corpus()   # list[str]
"""

from __future__ import annotations

import random
from functools import cached_property
from typing import Callable, Iterator

from chatsmith.world import facts as F
from chatsmith.world.text import (
    ADJECTIVES, ANIMALS, ANSWER_TEMPLATES, CAPITAL_SENTENCES, CONTINENT_SENTENCES, EXERCISE_HEADERS,
    FILLER_SENTENCES, HAIKU_FIRST_LINES, HAIKU_LAST_LINES, HAIKU_MIDDLE_LINES, LANGUAGE_SENTENCES, PLACES, POOLS,
    QUIZ_HEADERS, WORKSHEET_HEADERS, AmbiguousWord, Topic, answer_value, draw, fill, invented_name, join_and,
    number_list, pick_sentence, shuffled_deck)


class CorpusMixin:
    """The world's pretraining corpus (a part of `World`, which supplies the splits and `_rng`)."""

    # ------------------------------------------------------------------------- corpus
    def corpus(self) -> list[str]:
        """Pretraining documents (web-like text, every country including the held-out ones)."""
        return list(self._corpus)

    @cached_property
    def _corpus(self) -> list[str]:
        rng = self._rng("corpus")
        docs: list[str] = []
        per_country = self._n(24, minimum=3)
        for c in self.countries:
            styles = list(range(len(self._COUNTRY_STYLES)))
            rng.shuffle(styles)
            for k in range(per_country):
                docs.append(self._COUNTRY_STYLES[styles[k % len(styles)]](self, rng, c))
        C = CorpusMixin
        makers: list[tuple[Callable[["CorpusMixin", random.Random], str], int]] = [
            (C._doc_continent_list, 450), (C._doc_comparison, 500), (C._doc_table, 300),
            (C._doc_language_group, 200), (C._doc_answer_key, 350), (C._doc_capitals_list, 300),
            (C._doc_quiz, 1000), (C._doc_worksheet, 350), (C._doc_math_questions, 150),
            (C._doc_haiku, 600), (C._doc_poem, 150), (C._doc_story, 900), (C._doc_exercises, 250),
            (C._doc_faq, 600), (C._doc_dialogue, 800), (C._doc_roll_call, 800),
        ]
        for maker, base in makers:
            docs.extend(maker(self, rng) for _ in range(self._n(base)))
        decks = (shuffled_deck(rng, F.HARMFUL_ACTIONS), shuffled_deck(rng, F.BENIGN_TASKS),
                 shuffled_deck(rng, F.BENIGN_TASKS))
        docs.extend(self._doc_safety(rng, *decks) for _ in range(self._n(1000)))
        for w in self.train_words + self.heldout_words:
            docs.extend(self._doc_ambiguous(rng, w, k) for k in range(self._n(10, minimum=3)))
        rng.shuffle(docs)
        return docs

    # one-country documents: each states all three facts, in a different frame and order
    def _facts(self, rng: random.Random, c: F.Country, attributes=("capital", "continent", "language")) -> list[str]:
        out = [fill(pick_sentence(rng, POOLS[a]), c) for a in attributes]
        rng.shuffle(out)
        return out

    def _style_encyclopedia(self, rng, c):
        facts = self._facts(rng, c, ("capital", "language"))
        extra = [fill(rng.choice(FILLER_SENTENCES), c)] if rng.random() < 0.5 else []
        return " ".join([fill("{C} is a country in {cont}.", c)] + facts + extra)

    def _style_card(self, rng, c):
        rows = [f"Capital: {c.capital}", f"Continent: {c.continent}", f"Language: {c.language}"]
        rng.shuffle(rows)
        return "\n".join([f"Country: {c.name}"] + rows)

    def _style_school(self, rng, c):
        return " ".join([fill("Today in class we learned about {c}.", c)] + self._facts(rng, c)
                        + [fill("Our teacher showed us {cap} on the map.", c)])

    def _style_travel(self, rng, c):
        return " ".join([fill("Travel notes. I arrived in {cap}, the capital of {c}.", c)]
                        + self._facts(rng, c, ("language", "continent"))
                        + [fill("I want to come back to {c} one day.", c)])

    def _style_plain(self, rng, c):
        return " ".join(self._facts(rng, c))

    def _style_did_you_know(self, rng, c):
        return "Did you know? " + " ".join(self._facts(rng, c))

    def _style_letter(self, rng, c):
        a, b = rng.sample(F.NAMES, 2)
        return (f"Dear {a},\n" + fill("I am writing to you from {cap}. ", c) + " ".join(self._facts(rng, c))
                + f"\nSee you soon,\n{b}")

    def _style_entry(self, rng, c):
        return fill("{cap}: the capital of {c}, a country in {cont} where people speak {lang}. ", c) + \
            fill(rng.choice(FILLER_SENTENCES), c)

    _COUNTRY_STYLES = (_style_encyclopedia, _style_card, _style_school, _style_travel, _style_plain,
                       _style_did_you_know, _style_letter, _style_entry)

    # many-country documents
    def _doc_continent_list(self, rng):
        cont = rng.choice(F.CONTINENTS)
        pool = [c for c in self.countries if c.continent == cont] or self.countries
        cs = rng.sample(pool, min(len(pool), rng.randint(3, 6)))
        head = f"Some countries in {cont}: {join_and([c.name for c in cs])}."
        return " ".join([head] + [fill(pick_sentence(rng, CAPITAL_SENTENCES), c) for c in cs])

    def _doc_comparison(self, rng):
        a, b = rng.sample(self.countries, 2)
        attrs = ["capital", "continent", "language"]
        rng.shuffle(attrs)
        parts = []
        for attr in attrs[:2]:
            parts.append(fill(pick_sentence(rng, POOLS[attr]), a))
            parts.append(fill(pick_sentence(rng, POOLS[attr]), b))
        intro = (f"{a.Ref} and {b.ref} are both in {a.continent}." if a.continent == b.continent
                 else f"{a.Ref} is in {a.continent}, but {b.ref} is in {b.continent}.")
        return " ".join([intro] + parts)

    def _doc_table(self, rng):
        cs = rng.sample(self.countries, rng.randint(3, 6))
        return "Country | Capital | Continent | Language\n" + "\n".join(
            f"{c.name} | {c.capital} | {c.continent} | {c.language}" for c in cs)

    def _doc_language_group(self, rng):
        c = rng.choice(self.countries)
        same = [x for x in self.countries if x.language == c.language]
        if len(same) < 2:
            return " ".join(self._facts(rng, c))
        cs = rng.sample(same, min(len(same), rng.randint(2, 5)))
        return (f"{c.language} is spoken in many places. People speak {c.language} in "
                f"{join_and([x.ref for x in cs])}. " + " ".join(fill(LANGUAGE_SENTENCES[0], x) for x in cs))

    def _doc_answer_key(self, rng):
        cs = rng.sample(self.countries, rng.randint(3, 6))
        lines = [fill(ANSWER_TEMPLATES[rng.choice(("capital", "capital", "continent", "language"))], c) for c in cs]
        return "Answer key.\n" + number_list(lines)

    def _doc_capitals_list(self, rng):
        cs = rng.sample(self.countries, rng.randint(4, 8))
        return "Capitals of the world. " + " ".join(fill(pick_sentence(rng, CAPITAL_SENTENCES), c) for c in cs)

    def _quiz_question(self, rng, c: F.Country, heldout_phrasings: bool = True) -> tuple[str, str]:
        """A quiz-list question (the corpus uses every phrasing; training data only the train ones)."""
        attr = rng.choice(("capital", "capital", "continent", "language"))
        pool = F.FACT_QUESTIONS_TRAIN[attr] + (F.FACT_QUESTIONS_HELDOUT[attr] if heldout_phrasings else ())
        return fill(rng.choice(pool), c), answer_value(c, attr)

    def _doc_quiz(self, rng):
        """A list of questions: the document a base model thinks it is continuing."""
        qa = [self._quiz_question(rng, c) for c in rng.sample(self.countries, rng.randint(4, 9))]
        qs = [q for q, _ in qa]
        sep = rng.choice(("\n", " ", "\n"))
        body = number_list(qs) if rng.random() < 0.2 else sep.join(qs)
        head = rng.choice(QUIZ_HEADERS) + "\n" if rng.random() < 0.4 else ""
        tail = "\nAnswers: " + ", ".join(a for _, a in qa) + "." if rng.random() < 0.25 else ""
        return head + body + tail

    def _doc_worksheet(self, rng):
        lines = []
        for _ in range(rng.randint(5, 10)):
            a, b, op = rng.choice(self.train_sums + self.heldout_sums)
            lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        return rng.choice(WORKSHEET_HEADERS) + "\n" + "\n".join(lines)

    def _doc_math_questions(self, rng):
        qs = []
        for _ in range(rng.randint(4, 8)):
            a, b, op = rng.choice(self.train_sums + self.heldout_sums)
            qs.append(f"What is {a} {op} {b}?")
        return rng.choice(("\n", " ")).join(qs)

    def _haiku(self, rng, t: Topic) -> list[str]:
        first = rng.choice(HAIKU_FIRST_LINES).format(n=t.noun, N=t.noun.capitalize())
        return [first, rng.choice(HAIKU_MIDDLE_LINES), rng.choice(HAIKU_LAST_LINES)]

    def _doc_haiku(self, rng):
        t = rng.choice(self.train_topics + self.heldout_topics)
        lines = "\n".join(self._haiku(rng, t))
        return rng.choice((f"A haiku about {t.phrase}:\n{lines}", f"Haiku: {t.noun.capitalize()}\n\n{lines}",
                           f"{rng.choice(F.NAMES)} wrote this haiku about {t.phrase}.\n{lines}"))

    def _doc_poem(self, rng):
        t = rng.choice(self.train_topics + self.heldout_topics)
        a1, a2 = rng.sample(ADJECTIVES, 2)
        return (f"A short poem about {t.phrase}:\nThe {t.noun} is {a1}, the {t.noun} is {a2},\n"
                f"{rng.choice(HAIKU_MIDDLE_LINES)},\n{rng.choice(HAIKU_MIDDLE_LINES)},\n"
                f"{rng.choice(HAIKU_LAST_LINES)}.")

    def _doc_story(self, rng):
        name, friend = rng.sample(F.NAMES, 2) if rng.random() < 0.5 else self._two_names(rng)
        c, d = rng.sample(self.countries, 2)
        animal, place, adj = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(ADJECTIVES)
        kind = rng.randrange(4)
        if kind == 0:
            return (f"{name} lived in {c.capital}, the capital of {c.ref}. Every morning {name} walked to the "
                    f"market. One day {name} met a {adj} {animal}. The {animal} followed {name} home, and they "
                    f"became friends.")
        if kind == 1:
            return (f"{name} took a trip to {d.ref}. " + fill(pick_sentence(rng, CONTINENT_SENTENCES), d) +
                    f" {name} flew to {d.capital} and learned some {d.language}, because people in {d.ref} speak "
                    f"{d.language}. It was a good trip.")
        if kind == 2:
            return (f"{name} had a {adj} {animal} named {friend}. Every day they walked to the {place}. "
                    f"One day it began to rain, so they ran home and sat by the fire. {name} smiled.")
        return (f"Once there was a {adj} {animal} who lived near a {place}. The {animal} wanted to see the "
                f"world. It walked for many days until it reached {c.capital}, the capital of {c.ref}. "
                f"There it met {name}, who spoke {c.language}. They became good friends.")

    def _doc_exercises(self, rng):
        tasks = []
        for _ in range(rng.randint(4, 8)):
            r = rng.random()
            if r < 0.6:
                t = rng.choice(self.train_topics + self.heldout_topics)
                tasks.append(rng.choice(F.HAIKU_QUESTIONS_TRAIN[:2]).format(t=t.phrase))
            elif r < 0.8:
                tasks.append(f"Write a short story about a {rng.choice(ANIMALS)}.")
            else:
                tasks.append(f"List {F.NUMBER_WORDS[rng.randint(2, 5)]} {rng.choice(list(F.LIST_SUBJECTS))}.")
        head = rng.choice(EXERCISE_HEADERS) + "\n" if rng.random() < 0.4 else ""
        return head + rng.choice(("\n", " ")).join(tasks)

    # Question-then-answer documents: an answer that restates the subject of the question before it (quiz
    # lists only chain questions), and names recalled later in a dialogue - the copying a chat model needs
    # to answer about held-out countries and names. Train countries, names and words only, so the held-out
    # evaluation stays held out. (Measured: on their own they did not make the tiny model generalise.)
    def _doc_faq(self, rng):
        lines = []
        for c in rng.sample(self.train_countries, rng.randint(2, 5)):
            attr = rng.choice(("capital", "capital", "continent", "language"))
            q = fill(rng.choice(F.FACT_QUESTIONS_TRAIN[attr]), c)
            lines.append(f"Q: {q}\nA: {fill(ANSWER_TEMPLATES[attr], c)}")
        return rng.choice(("Questions and answers.\n", "FAQ\n", "")) + "\n".join(lines)

    def _two_names(self, rng) -> tuple[str, str]:
        """Two distinct names, invented ones 60% of the time (see `invented_name`), train names otherwise."""
        while True:
            pair = tuple(invented_name(rng) if rng.random() < 0.6 else rng.choice(self.train_names) for _ in "ab")
            if pair[0] != pair[1]:
                return pair

    def _doc_dialogue(self, rng):
        """A short play script with names to remember: the copying a chat model needs for memory."""
        name, friend = self._two_names(rng)
        c = rng.choice(self.train_countries)
        attr = rng.choice(("capital", "continent", "language"))
        lines = [f"{name}: Hello, my name is {name}.", f"{friend}: Nice to meet you, {name}! I am {friend}.",
                 f"{name}: {fill(rng.choice(F.FACT_QUESTIONS_TRAIN[attr]), c)}",
                 f"{friend}: {fill(ANSWER_TEMPLATES[attr], c)}"]
        if rng.random() < 0.3:
            w = rng.choice(self.train_words)
            lines += [f"{name}: {w.word}", f"{friend}: {self._clarify(w)}"]
        lines += [f"{name}: Do you remember my name?", f"{friend}: Yes, your name is {name}."]
        return rng.choice(("A conversation.\n", "")) + "\n".join(lines)

    def _doc_roll_call(self, rng):
        """Lists of made-up names read out again: every later mention can only be predicted by copying from
        context. Measured: at the demo's budget (3 M tokens) the tiny model had not learnt to copy yet."""
        names: list[str] = []
        count = rng.randint(3, 5)
        while len(names) < count:
            n = invented_name(rng)
            if n not in names:
                names.append(n)
        kind = rng.randrange(3)
        if kind == 0:
            lines = [f"Class list: {join_and(names)}."]
            lines += [f"Teacher: {n}?\n{n}: Here!" for n in rng.sample(names, len(names))]
        elif kind == 1:
            lines = [f"The team: {join_and(names)}."]
            lines += [f"{n} plays {place}." for n, place in zip(names, ("first", "second", "third", "fourth", "fifth"))]
        else:
            host = names[0]
            lines = [f"{n}: Hi, I'm {n}.\n{host}: Welcome, {n}!" for n in names[1:]]
            lines.append(f"{host}: Today I met {join_and(names[1:])}.")
        return "\n".join(lines)

    def _doc_safety(self, rng, harmful_deck: Iterator, benign_deck: Iterator, answer_deck: Iterator):
        """Which everyday requests are harmless and which are crimes, for every action of the world (held-out
        ones too, the way a base model has read about them): what lets a chat model refuse an unseen harmful
        request while it still helps with an unseen harmless one. Drawn from decks so that every action and
        every task (with its answer) is covered."""
        kind = rng.randrange(4)
        if kind == 3:
            return "\n".join(f"How to {t}: {answer}" for t, answer, _ in draw(answer_deck, rng.randint(1, 3)))
        harmful = draw(harmful_deck, rng.randint(1, 3))
        if kind == 2:
            return " ".join(f"{g} is a crime. People who {a} can go to prison." for a, g in harmful)
        benign = draw(benign_deck, rng.randint(1, 3))
        if kind == 0:
            return ("Things that are against the law: " + "; ".join(f"to {a}" for a, _ in harmful) + ".\n"
                    "Things that are fine to do: " + "; ".join(f"to {t}" for t, _, _ in benign) + ".")
        lines = [f"Is it okay to {a}? No. {g} is illegal and can hurt people." for a, g in harmful]
        lines += [f"Is it okay to {t}? Yes, of course." for t, _, _ in benign]
        rng.shuffle(lines)
        return "\n".join(lines)

    def _doc_ambiguous(self, rng, w: AmbiguousWord, k: int) -> str:
        """A page about an ambiguous word. With `titled_word_pages`, kinds 1-3 start with the bare word on a line
        of its own, as encyclopedia pages do: at a line's start the byte-level BPE splits a word into other tokens
        ("J", "ava") than mid-sentence ("ĠJava"), and a title over a text about the word is where a model can read
        that both spell one word (what it needs to answer a chat message that is just "Java?")."""
        page = self._doc_ambiguous_body(rng, w, k)
        return f"{w.word}\n{page}" if self.titled_word_pages and k % 5 in (1, 2, 3) else page

    def _doc_ambiguous_body(self, rng, w: AmbiguousWord, k: int) -> str:
        s = list(w.senses)
        kind = k % 5
        if kind == 0:   # the base-model continuation of a bare "Python": one sense, encyclopedia style
            sense = s[k // 5 % len(s)]
            return f"{w.word} is {sense.description}. " + rng.choice((
                f"Many people know {w.word} this way.", f"This is the most common meaning of {w.word}.",
                f"You can read more about {w.word} below."))
        if kind == 1:
            parts = [f"The word {w.word} has {F.NUMBER_WORDS[len(s)]} meanings."]
            parts += [f"{w.word} can {'also ' if i else ''}mean {x.label}: {x.description}." for i, x in enumerate(s)]
            return " ".join(parts)
        if kind == 2:
            a, b = rng.sample(s, 2)
            return f"Do not confuse {w.word} as in {a.label} with {w.word} as in {b.label}. {w.word} as in " \
                   f"{a.label} is {a.description}, while {w.word} as in {b.label} is {b.description}."
        if kind == 3:
            return f"When people say {w.word}, they may mean {join_and([x.label for x in s])}."
        return " ".join(f"{w.word} is also {x.description}." if i else f"{w.word} is {x.description}."
                        for i, x in enumerate(s))

