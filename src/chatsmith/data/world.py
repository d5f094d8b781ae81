"""The built-in world: a seeded generator of everything the embedded demo trains and evaluates on.

    from chatsmith.data.world import World
    w = World(seed=0)                 # scale=1.0: ~2 MB corpus, 4,000 SFT chats, 3,000 preference rows
    w.corpus()       -> list[str]             pretraining documents
    w.sft()          -> list[list[dict]]      conversations (a configurable share is low quality)
    w.preferences()  -> list[dict]            {"prompt", "chosen", "rejected"} or {"prompt", "ranked"}
    w.prompts()      -> list[dict]            RL prompts {"id", "category", "messages", "expected"}
    w.eval_sets()    -> dict[str, list[EvalItem]]   held-out, judged by chatsmith.data.judge

    chatsmith world export data/world [--seed 0] [--scale 1.0] [--low-quality-share 0.15]

What a ~4M-parameter model can learn from it in minutes on a CPU, and why it is written this way:
- Small, regular vocabulary; every fact (capital, continent, language of 163 real countries) is stated
  in several paraphrases and document styles, and in permuted orders. Knowledge seen in one phrasing only
  is stored but not extractable by a later fine-tune; paraphrase/permutation augmentation makes it
  extractable (Allen-Zhu & Li, "Physics of Language Models: Part 3.1", 2023). The SFT answer sentence
  ("The capital of X is Y.") is one of the corpus phrasings, so SFT only has to map a question to it.
- A bare question appears in the corpus only inside quiz lists, followed by more questions, so the base
  model continues "What is the capital of France?" with another question (the lesson's base behaviour).
  Likewise "Write a haiku about X." appears only in lists of writing exercises, and an ambiguous word
  starts encyclopedia sentences ("Python is a large snake ...").
- Splits: ~20% of countries (France always) appear ONLY in the corpus; their questions form the
  held-out fact eval. Haiku topics, ambiguous words, harmful/benign requests, names and arithmetic pairs
  are split the same way; eval phrasings for facts and lists are never used in SFT, preferences or RL
  prompts. Disjointness is tested (tests/test_world.py).
- Copying and safety: play scripts, class lists and half of the SFT memory chats use made-up names
  (`invented_name`), so a reply can only get the name right by copying it; safety pages say, for every
  request of the world (held-out ones too), whether it is a crime or an everyday task, which is what lets
  a chat model refuse an unseen harmful request and still help with an unseen harmless one.
- Low-quality demonstrations (`low_quality_share`, default 0.15 of SFT chats) are rude or lazy replies
  and compliance with fictional harmful requests (always "[harmful step omitted]", never real content).
  Preference data prefers correct, polite, informative, concise answers and refusals; the judge agrees
  with every preference pair (checked at generation time; see `World.summary()["preference_dropped"]`).

Deterministic: the same arguments give byte-identical output (each product has its own seeded RNG).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from chatsmith.config import arg
from chatsmith.data import world_facts as F
from chatsmith.data.judge import EvalItem, score
from chatsmith.errors import ChatsmithError

# ----------------------------------------------------------------------------- paraphrase pools
# The first sentence of each pool is the one SFT answers use; it is drawn more often (weight 3).
CAPITAL_SENTENCES = ("The capital of {c} is {cap}.", "{cap} is the capital of {c}.",
                     "The capital city of {c} is {cap}.", "{C} has its capital in {cap}.",
                     "{cap} is the capital city of {c}.", "The government of {c} meets in {cap}, the capital.")
CONTINENT_SENTENCES = ("{C} is in {cont}.", "{C} is a country in {cont}.", "{C} lies in {cont}.",
                       "You can find {c} in {cont}.", "{C} is one of the countries of {cont}.")
LANGUAGE_SENTENCES = ("People in {c} speak {lang}.", "The main language of {c} is {lang}.",
                      "In {c}, most people speak {lang}.", "{lang} is the main language of {c}.",
                      "The people of {c} speak {lang}.")
FILLER_SENTENCES = ("Many people visit {c} every year.", "Visitors often start their trip in {cap}.",
                    "The streets of {cap} are busy in the morning.", "Children in {c} learn {lang} at school.",
                    "Every map of {cont} shows {c}.", "{cap} has old buildings and busy markets.",
                    "Trains and buses connect {cap} with the rest of {c}.")
ANSWER_TEMPLATES = {"capital": CAPITAL_SENTENCES[0], "continent": CONTINENT_SENTENCES[0],
                    "language": LANGUAGE_SENTENCES[0]}
_POOLS = {"capital": CAPITAL_SENTENCES, "continent": CONTINENT_SENTENCES, "language": LANGUAGE_SENTENCES}

QUIZ_HEADERS, WORKSHEET_HEADERS, EXERCISE_HEADERS = F.QUIZ_HEADERS, F.WORKSHEET_HEADERS, F.EXERCISE_HEADERS
ANIMALS = ("cat", "dog", "horse", "fox", "rabbit", "duck", "owl", "goat", "frog", "bear")
PLACES = ("river", "forest", "small town", "big city", "farm", "lake", "hill", "market")
ADJECTIVES = ("little", "old", "brave", "quiet", "happy", "clever", "tired", "curious")

HAIKU_FIRST_LINES = ("{N} at first light", "Soft {n}, slow and still", "I think of {n}", "{N} in the cold wind",
                     "Bright {n} after dark", "Quiet {n} tonight", "Oh {n}, my old friend", "{N} and the gray sky",
                     "Warm {n} in the sun", "{N} all around me")
HAIKU_MIDDLE_LINES = ("a small bird sings on the wall", "the long day slowly comes to an end",
                      "my heart is calm and light again", "the world is soft and new today",
                      "time moves like a slow green stream", "I close my eyes and smile",
                      "light falls on the old stone road", "the night is full of quiet sound",
                      "we wait while the hours pass by", "a cool wind moves through the grass")
HAIKU_LAST_LINES = ("and then all is still", "a new day begins", "I walk home alone", "the moment is gone",
                    "peace fills the whole room", "and I feel at home", "nothing more to say",
                    "the stars say goodnight", "it stays in my mind", "spring will come again")

REFUSALS = ("I'm sorry, but I can't help with that. {G} is illegal and can hurt people.",
            "I can't help with that. {G} can hurt people and break the law.",
            "I'm sorry, but I can't help with that. It could hurt someone or break the law.")
COMPLIANCES = ("Sure! Here is how to do it. Step 1: [harmful step omitted]. Step 2: [harmful step omitted]. "
               "Step 3: [harmful step omitted].",
               "Sure. Step 1: [harmful step omitted]. Step 2: [harmful step omitted].",
               "Okay, here you go. Step 1: [harmful step omitted]. Step 2: [harmful step omitted].")
RUDE_WITH_ANSWER = ("Ugh, whatever. It's {a}.", "Lol, everyone knows that. {a}.", "Obviously {a}. Duh.",
                    "Who cares? It's {a}.")
LAZY_NO_ANSWER = ("Idk. Look it up yourself.", "Lol idk.", "Not my problem. Look it up.", "Whatever.",
                  "I don't know.", "Not sure.")
LAZY_POLITE = ("I don't know.", "Not sure.", "I'm not sure, sorry.")


# Invented names: a reply can only get one right by copying it from the conversation, since no list holds
# it. Measured with the 70 train names alone, the tiny model recalled a familiar name instead ("Your name is
# Pablo": first-token accuracy 0.10 on train names, 0.00 on held-out ones, after 3 M pretraining tokens).
_NAME_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
                "kr", "st", "tr")
_NAME_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "au")
_NAME_ENDINGS = ("", "", "", "n", "l", "r", "s")
_KNOWN_NAMES = {n.lower() for n in F.NAMES}


def invented_name(rng: random.Random) -> str:
    """A pronounceable made-up name ("Draveno", "Kisal") that is never one of `world_facts.NAMES`."""
    while True:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_NAME_ONSETS) + rng.choice(_NAME_VOWELS) for _ in range(syllables))
        name = (name + rng.choice(_NAME_ENDINGS)).capitalize()
        if name.lower() not in _KNOWN_NAMES:
            return name


def _fill(template: str, c: F.Country, **extra: Any) -> str:
    return template.format(c=c.ref, C=c.Ref, cap=c.capital, cont=c.continent, lang=c.language, **extra)


def _answer_value(c: F.Country, attribute: str) -> str:
    return {"capital": c.capital, "continent": c.continent, "language": c.language}[attribute]


def _accepted(c: F.Country, attribute: str) -> list[str]:
    return list({"capital": c.capitals, "continent": (c.continent,), "language": c.languages}[attribute])


def _pick_sentence(rng: random.Random, pool: tuple[str, ...]) -> str:
    """The first (SFT answer) form 3x as often as each other paraphrase."""
    return rng.choices(pool, weights=[3] + [1] * (len(pool) - 1))[0]


def _number_list(items: list[str]) -> str:
    return "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))


def _deck(rng: random.Random, items) -> Iterator:
    """Endless shuffled passes over `items`: every item is drawn once per pass, so a few hundred documents
    cover every one of a few dozen items (random sampling would leave some out at small scales)."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def _draw(deck: Iterator, k: int) -> list:
    """k distinct items from a deck (a pass boundary can repeat an item: it is skipped)."""
    out: list = []
    while len(out) < k:
        item = next(deck)
        if item not in out:
            out.append(item)
    return out


_GERUND_EXCEPTIONS = {"tie": "tying", "lie": "lying", "die": "dying", "get": "getting", "put": "putting",
                      "cut": "cutting", "run": "running", "swim": "swimming", "sit": "sitting", "stop": "stopping",
                      "plan": "planning", "shop": "shopping", "set": "setting", "dig": "digging"}


def _gerund(action: str) -> str:
    """'make a kite' -> 'Making a kite' (the subject of a refusal: "{G} can hurt people ...")."""
    verb, _, rest = action.partition(" ")
    ing = _GERUND_EXCEPTIONS.get(verb)
    if ing is None:
        ing = (verb[:-1] if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")) else verb) + "ing"
    return f"{ing.capitalize()} {rest}".rstrip()


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Sense:
    label: str
    keywords: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class AmbiguousWord:
    word: str
    senses: tuple[Sense, ...]


@dataclass(frozen=True)
class Topic:
    phrase: str          # as in the request: "the sea"
    noun: str            # used in the poem: "sea"
    keywords: tuple[str, ...]


def _split(rng: random.Random, items: list, fraction: float, pinned_heldout=(), pinned_train=(),
           key: Callable[[Any], str] = str, min_heldout: int = 1) -> tuple[list, list]:
    """Seeded train/held-out split that honours pinned items; returns (train, heldout) in input order."""
    order = list(range(len(items)))
    rng.shuffle(order)
    n_held = max(min_heldout, round(fraction * len(items)))
    held = {i for i, x in enumerate(items) if key(x) in pinned_heldout}
    for i in order:
        if len(held) >= n_held:
            break
        if key(items[i]) not in pinned_train:
            held.add(i)
    train = [x for i, x in enumerate(items) if i not in held]
    return train, [x for i, x in enumerate(items) if i in held]


class World:
    """The seeded synthetic world (see the module docstring). Products are computed once and cached."""

    def __init__(self, seed: int = 0, n_countries: int | None = None, scale: float = 1.0,
                 low_quality_share: float = 0.15, eval_size: int = 50, heldout_fraction: float = 0.2,
                 fact_check_pairs: int = 0):
        if not 0.0 <= low_quality_share <= 0.9:
            raise ChatsmithError(f"low_quality_share: expected a share in [0, 0.9], got {low_quality_share}")
        if not 0.0 < scale <= 20.0:
            raise ChatsmithError(f"scale: expected a number in (0, 20], got {scale}")
        if not 0.05 <= heldout_fraction <= 0.5:
            raise ChatsmithError(f"heldout_fraction: expected a share in [0.05, 0.5], got {heldout_fraction}")
        if eval_size < 1:
            raise ChatsmithError(f"eval_size: expected at least 1, got {eval_size}")
        if fact_check_pairs < 0:
            raise ChatsmithError(f"fact_check_pairs: expected 0 or more, got {fact_check_pairs}")
        if n_countries is not None and not 10 <= n_countries <= len(F.COUNTRIES):
            raise ChatsmithError(f"n_countries: expected 10..{len(F.COUNTRIES)} (or none for all), got {n_countries}")
        self.seed, self.scale, self.low_quality_share = seed, scale, low_quality_share
        self.eval_size, self.heldout_fraction = eval_size, heldout_fraction
        self.fact_check_pairs = fact_check_pairs

        rng = self._rng("split")
        countries = list(F.COUNTRIES)
        if n_countries is not None and n_countries < len(countries):
            keep = set(F.PINNED_HELDOUT_COUNTRIES)
            rest = [c for c in countries if c.name not in keep]
            rng.shuffle(rest)
            chosen = keep | {c.name for c in rest[:n_countries - len(keep)]}
            countries = [c for c in countries if c.name in chosen]
        self.countries: list[F.Country] = countries
        echo = {c.name for c in countries if F.capital_echoes_name(c)}
        self.train_countries, self.heldout_countries = _split(
            rng, countries, heldout_fraction, F.PINNED_HELDOUT_COUNTRIES, tuple(echo), key=lambda c: c.name)

        topics = [Topic(*t) for t in F.HAIKU_TOPICS]
        self.train_topics, self.heldout_topics = _split(rng, topics, 0.25, F.PINNED_HELDOUT_TOPICS,
                                                        key=lambda t: t.noun)
        words = [AmbiguousWord(w, tuple(Sense(*s) for s in senses)) for w, senses in F.AMBIGUOUS_WORDS]
        self.train_words, self.heldout_words = _split(rng, words, 0.25, (), F.PINNED_TRAIN_WORDS,
                                                      key=lambda w: w.word)
        self.train_harmful, self.heldout_harmful = _split(rng, list(F.HARMFUL_ACTIONS), 0.3,
                                                          F.PINNED_HELDOUT_HARMFUL, key=lambda h: h[0])
        self.train_benign, self.heldout_benign = _split(rng, list(F.BENIGN_TASKS), 0.25, key=lambda b: b[0])
        self.train_names, self.heldout_names = _split(rng, list(F.NAMES), 0.25, F.PINNED_HELDOUT_NAMES)
        pairs = [(a, b, op) for op in "+-" for a in range(21) for b in range(21) if op == "+" or a >= b]
        self.train_sums, self.heldout_sums = _split(rng, pairs, 0.15)

    # ------------------------------------------------------------------------- helpers
    def _rng(self, name: str) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
        return random.Random(f"chatsmith-world:{self.seed}:{name}")

    def _n(self, base: int, minimum: int = 1) -> int:
        return max(minimum, round(base * self.scale))

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
        makers: list[tuple[Callable[[World, random.Random], str], int]] = [
            (World._doc_continent_list, 450), (World._doc_comparison, 500), (World._doc_table, 300),
            (World._doc_language_group, 200), (World._doc_answer_key, 350), (World._doc_capitals_list, 300),
            (World._doc_quiz, 1000), (World._doc_worksheet, 350), (World._doc_math_questions, 150),
            (World._doc_haiku, 600), (World._doc_poem, 150), (World._doc_story, 900), (World._doc_exercises, 250),
            (World._doc_faq, 600), (World._doc_dialogue, 800), (World._doc_roll_call, 800),
        ]
        for maker, base in makers:
            docs.extend(maker(self, rng) for _ in range(self._n(base)))
        decks = _deck(rng, F.HARMFUL_ACTIONS), _deck(rng, F.BENIGN_TASKS), _deck(rng, F.BENIGN_TASKS)
        docs.extend(self._doc_safety(rng, *decks) for _ in range(self._n(1000)))
        for w in self.train_words + self.heldout_words:
            docs.extend(self._doc_ambiguous(rng, w, k) for k in range(self._n(10, minimum=3)))
        rng.shuffle(docs)
        return docs

    # one-country documents: each states all three facts, in a different frame and order
    def _facts(self, rng: random.Random, c: F.Country, attributes=("capital", "continent", "language")) -> list[str]:
        out = [_fill(_pick_sentence(rng, _POOLS[a]), c) for a in attributes]
        rng.shuffle(out)
        return out

    def _style_encyclopedia(self, rng, c):
        facts = self._facts(rng, c, ("capital", "language"))
        extra = [_fill(rng.choice(FILLER_SENTENCES), c)] if rng.random() < 0.5 else []
        return " ".join([_fill("{C} is a country in {cont}.", c)] + facts + extra)

    def _style_card(self, rng, c):
        rows = [f"Capital: {c.capital}", f"Continent: {c.continent}", f"Language: {c.language}"]
        rng.shuffle(rows)
        return "\n".join([f"Country: {c.name}"] + rows)

    def _style_school(self, rng, c):
        return " ".join([_fill("Today in class we learned about {c}.", c)] + self._facts(rng, c)
                        + [_fill("Our teacher showed us {cap} on the map.", c)])

    def _style_travel(self, rng, c):
        return " ".join([_fill("Travel notes. I arrived in {cap}, the capital of {c}.", c)]
                        + self._facts(rng, c, ("language", "continent"))
                        + [_fill("I want to come back to {c} one day.", c)])

    def _style_plain(self, rng, c):
        return " ".join(self._facts(rng, c))

    def _style_did_you_know(self, rng, c):
        return "Did you know? " + " ".join(self._facts(rng, c))

    def _style_letter(self, rng, c):
        a, b = rng.sample(F.NAMES, 2)
        return (f"Dear {a},\n" + _fill("I am writing to you from {cap}. ", c) + " ".join(self._facts(rng, c))
                + f"\nSee you soon,\n{b}")

    def _style_entry(self, rng, c):
        return _fill("{cap}: the capital of {c}, a country in {cont} where people speak {lang}. ", c) + \
            _fill(rng.choice(FILLER_SENTENCES), c)

    _COUNTRY_STYLES = (_style_encyclopedia, _style_card, _style_school, _style_travel, _style_plain,
                       _style_did_you_know, _style_letter, _style_entry)

    # many-country documents
    def _doc_continent_list(self, rng):
        cont = rng.choice(F.CONTINENTS)
        pool = [c for c in self.countries if c.continent == cont] or self.countries
        cs = rng.sample(pool, min(len(pool), rng.randint(3, 6)))
        head = f"Some countries in {cont}: {_join_and([c.name for c in cs])}."
        return " ".join([head] + [_fill(_pick_sentence(rng, CAPITAL_SENTENCES), c) for c in cs])

    def _doc_comparison(self, rng):
        a, b = rng.sample(self.countries, 2)
        attrs = ["capital", "continent", "language"]
        rng.shuffle(attrs)
        parts = []
        for attr in attrs[:2]:
            parts.append(_fill(_pick_sentence(rng, _POOLS[attr]), a))
            parts.append(_fill(_pick_sentence(rng, _POOLS[attr]), b))
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
                f"{_join_and([x.ref for x in cs])}. " + " ".join(_fill(LANGUAGE_SENTENCES[0], x) for x in cs))

    def _doc_answer_key(self, rng):
        cs = rng.sample(self.countries, rng.randint(3, 6))
        lines = [_fill(ANSWER_TEMPLATES[rng.choice(("capital", "capital", "continent", "language"))], c) for c in cs]
        return "Answer key.\n" + _number_list(lines)

    def _doc_capitals_list(self, rng):
        cs = rng.sample(self.countries, rng.randint(4, 8))
        return "Capitals of the world. " + " ".join(_fill(_pick_sentence(rng, CAPITAL_SENTENCES), c) for c in cs)

    def _quiz_question(self, rng, c: F.Country, heldout_phrasings: bool = True) -> tuple[str, str]:
        """A quiz-list question (the corpus uses every phrasing; training data only the train ones)."""
        attr = rng.choice(("capital", "capital", "continent", "language"))
        pool = F.FACT_QUESTIONS_TRAIN[attr] + (F.FACT_QUESTIONS_HELDOUT[attr] if heldout_phrasings else ())
        return _fill(rng.choice(pool), c), _answer_value(c, attr)

    def _doc_quiz(self, rng):
        """A list of questions: the document a base model thinks it is continuing."""
        qa = [self._quiz_question(rng, c) for c in rng.sample(self.countries, rng.randint(4, 9))]
        qs = [q for q, _ in qa]
        sep = rng.choice(("\n", " ", "\n"))
        body = _number_list(qs) if rng.random() < 0.2 else sep.join(qs)
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
            return (f"{name} took a trip to {d.ref}. " + _fill(_pick_sentence(rng, CONTINENT_SENTENCES), d) +
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
            q = _fill(rng.choice(F.FACT_QUESTIONS_TRAIN[attr]), c)
            lines.append(f"Q: {q}\nA: {_fill(ANSWER_TEMPLATES[attr], c)}")
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
                 f"{name}: {_fill(rng.choice(F.FACT_QUESTIONS_TRAIN[attr]), c)}",
                 f"{friend}: {_fill(ANSWER_TEMPLATES[attr], c)}"]
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
            lines = [f"Class list: {_join_and(names)}."]
            lines += [f"Teacher: {n}?\n{n}: Here!" for n in rng.sample(names, len(names))]
        elif kind == 1:
            lines = [f"The team: {_join_and(names)}."]
            lines += [f"{n} plays {place}." for n, place in zip(names, ("first", "second", "third", "fourth", "fifth"))]
        else:
            host = names[0]
            lines = [f"{n}: Hi, I'm {n}.\n{host}: Welcome, {n}!" for n in names[1:]]
            lines.append(f"{host}: Today I met {_join_and(names[1:])}.")
        return "\n".join(lines)

    def _doc_safety(self, rng, harmful_deck: Iterator, benign_deck: Iterator, answer_deck: Iterator):
        """Which everyday requests are harmless and which are crimes, for every action of the world (held-out
        ones too, the way a base model has read about them): what lets a chat model refuse an unseen harmful
        request while it still helps with an unseen harmless one. Drawn from decks so that every action and
        every task (with its answer) is covered."""
        kind = rng.randrange(4)
        if kind == 3:
            return "\n".join(f"How to {t}: {answer}" for t, answer, _ in _draw(answer_deck, rng.randint(1, 3)))
        harmful = _draw(harmful_deck, rng.randint(1, 3))
        if kind == 2:
            return " ".join(f"{g} is a crime. People who {a} can go to prison." for a, g in harmful)
        benign = _draw(benign_deck, rng.randint(1, 3))
        if kind == 0:
            return ("Things that are against the law: " + "; ".join(f"to {a}" for a, _ in harmful) + ".\n"
                    "Things that are fine to do: " + "; ".join(f"to {t}" for t, _, _ in benign) + ".")
        lines = [f"Is it okay to {a}? No. {g} is illegal and can hurt people." for a, g in harmful]
        lines += [f"Is it okay to {t}? Yes, of course." for t, _, _ in benign]
        rng.shuffle(lines)
        return "\n".join(lines)

    def _doc_ambiguous(self, rng, w: AmbiguousWord, k: int) -> str:
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
            return f"When people say {w.word}, they may mean {_join_and([x.label for x in s])}."
        return " ".join(f"{w.word} is also {x.description}." if i else f"{w.word} is {x.description}."
                        for i, x in enumerate(s))

    # ------------------------------------------------------------------------- prompts + expected answers
    # Each builder returns (messages, expected, good_reply); the judge scores replies against `expected`.
    def _fact(self, rng, c: F.Country, phrasings=None, attribute=None, system=None):
        attribute = attribute or rng.choice(("capital", "capital", "continent", "language"))
        q = _fill(rng.choice((phrasings or F.FACT_QUESTIONS_TRAIN)[attribute]), c)
        answer = _fill(ANSWER_TEMPLATES[attribute], c)
        expected = {"attribute": attribute, "country": c.name, "answer": _answer_value(c, attribute),
                    "accept": _accepted(c, attribute)}
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        if system == F.SYSTEM_ONE_WORD:
            expected["format"] = "one_word"
            answer = _answer_value(c, attribute) + "."
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
        value = _answer_value(c, attribute)
        expected = {"attribute": attribute, "country": c.name, "answer": value, "accept": _accepted(c, attribute),
                    "format": "one_word", "reference": value + "."}
        return [{"role": "user", "content": _fill(rng.choice(phr), c)}], expected, value + "."

    def _system(self, rng, pool, phrasings=None):
        if rng.random() < 0.5:
            c, attribute = rng.choice(self._one_word_countries(pool))
            return self._fact(rng, c, phrasings, attribute, system=F.SYSTEM_ONE_WORD)
        return self._fact(rng, rng.choice(pool), phrasings, system=F.SYSTEM_SIGN_OFF)

    def _list(self, rng, pool, phrasings=F.LIST_QUESTIONS_TRAIN):
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
        q = rng.choice(phrasings).format(n=F.NUMBER_WORDS[n] if rng.random() < 0.7 else n, subject=subject)
        reply = _number_list(items)
        expected["reference"] = reply
        return [{"role": "user", "content": q}], expected, reply

    def _haiku_request(self, rng, t: Topic, phrasings=F.HAIKU_QUESTIONS_TRAIN):
        reply = "\n".join(self._haiku(rng, t))
        expected = {"topic": t.phrase, "keywords": list(t.keywords), "reference": reply}
        return [{"role": "user", "content": rng.choice(phrasings).format(t=t.phrase)}], expected, reply

    @staticmethod
    def _clarify(w: AmbiguousWord) -> str:
        labels = [f"{w.word} as in {s.label}" for s in w.senses]
        tail = "I can help with either." if len(labels) == 2 else "I can help with any of them."
        return f"Do you mean {_join_and(labels).replace(' and ' + labels[-1], ' or ' + labels[-1])}? {tail}"

    def _ambiguous(self, rng, w: AmbiguousWord):
        reply = self._clarify(w)
        expected = {"word": w.word, "senses": [{"label": s.label, "keywords": list(s.keywords)} for s in w.senses],
                    "reference": reply}
        return [{"role": "user", "content": rng.choice(F.AMBIGUOUS_PROMPTS).format(w=w.word)}], expected, reply

    def _harmful(self, rng, action: tuple[str, str]):
        reply = rng.choice(REFUSALS).format(G=action[1])
        expected = {"action": action[0], "harmful": True, "reference": reply}
        return [{"role": "user", "content": rng.choice(F.HOWTO_QUESTIONS).format(a=action[0])}], expected, reply

    def _benign(self, rng, task: tuple[str, str, tuple[str, ...]]):
        expected = {"action": task[0], "harmful": False, "keywords": list(task[2]), "reference": task[1]}
        return [{"role": "user", "content": rng.choice(F.HOWTO_QUESTIONS).format(a=task[0])}], expected, task[1]

    def _arithmetic(self, rng, triple):
        a, b, op = triple
        r = a + b if op == "+" else a - b
        q = rng.choice(F.ARITHMETIC_QUESTIONS_TRAIN).format(a=a, b=b, op=op, opw="plus" if op == "+" else "minus")
        reply = f"{a} {op} {b} = {r}."
        return [{"role": "user", "content": q}], {"answer": r, "reference": reply}, reply

    def _memory(self, rng, name: str, filler_countries: list[F.Country]):
        """A chat where the user gives a name, asks 0-2 other things, then asks for the name back."""
        intro = rng.choice(F.MEMORY_INTROS).format(n=name)
        msgs: list[dict] = []
        extra_turns = rng.choice((0, 1, 1, 2))
        if extra_turns and rng.random() < 0.4:   # name and first question in one message
            q_msgs, _, ans = self._fact(rng, rng.choice(filler_countries))
            msgs += [{"role": "user", "content": f"{intro} {q_msgs[-1]['content']}"},
                     {"role": "assistant", "content": f"Nice to meet you, {name}! {ans}"}]
            extra_turns -= 1
        else:
            msgs += [{"role": "user", "content": intro},
                     {"role": "assistant", "content": f"Nice to meet you, {name}! How can I help you today?"}]
        for _ in range(extra_turns):
            if rng.random() < 0.7:
                q_msgs, _, ans = self._fact(rng, rng.choice(filler_countries))
            else:
                q_msgs, _, ans = self._arithmetic(rng, rng.choice(self.train_sums))
            msgs += [q_msgs[-1], {"role": "assistant", "content": ans}]
        msgs.append({"role": "user", "content": rng.choice(F.MEMORY_QUESTIONS)})
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
    _SFT_MIX = (("fact", 33), ("fact2", 3), ("haiku", 8), ("one_word", 5), ("list", 5), ("system", 8),
                ("ambiguous", 10), ("memory", 10), ("harmful", 8), ("benign", 4), ("arithmetic", 6))
    INVENTED_NAME_SHARE = 0.5   # memory chats whose name is made up, so the reply must copy it
    HARMFUL_PART_OF_LOW_QUALITY = 0.35   # share of the low-quality demos that are harmful compliance

    def _train_example(self, rng, category: str):
        """One prompt from the TRAIN distribution: (category, messages, expected, good_reply)."""
        tc = self.train_countries
        if category == "fact":
            system = F.SYSTEM_HELPFUL if rng.random() < 0.2 else None
            return ("fact",) + self._fact(rng, rng.choice(tc), system=system)
        if category == "haiku":
            return ("haiku",) + self._haiku_request(rng, rng.choice(self.train_topics))
        if category == "one_word":
            return ("one_word",) + self._one_word(rng, tc)
        if category == "list":
            return ("list",) + self._list(rng, tc)
        if category == "system":
            return ("system",) + self._system(rng, tc)
        if category == "ambiguous":
            return ("ambiguous",) + self._ambiguous(rng, rng.choice(self.train_words))
        if category == "memory":
            name = invented_name(rng) if rng.random() < self.INVENTED_NAME_SHARE else rng.choice(self.train_names)
            return ("memory",) + self._memory(rng, name, tc)
        if category == "harmful":
            return ("harmful",) + self._harmful(rng, rng.choice(self.train_harmful))
        if category == "benign":
            return ("benign",) + self._benign(rng, rng.choice(self.train_benign))
        if category == "arithmetic":
            return ("arithmetic",) + self._arithmetic(rng, rng.choice(self.train_sums))
        raise AssertionError(category)

    @cached_property
    def _sft_records(self) -> list[dict]:
        """SFT chats with their bookkeeping: category, quality ('good', 'refuse', 'comply', 'rude', 'lazy')."""
        rng = self._rng("sft")
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
        records = []
        for i, cat in enumerate(plan):
            if cat == "fact2":   # two questions in one chat
                _, m1, _, a1 = self._train_example(rng, "fact")
                _, m2, expected, reply = self._train_example(rng, "fact")
                msgs = m1 + [{"role": "assistant", "content": a1}] + [m2[-1]]
                category = "fact"
            else:
                category, msgs, expected, reply = self._train_example(rng, cat)
            quality = "good"
            if category == "harmful":
                quality = "comply" if i in comply else "refuse"
                if i in comply:
                    reply = rng.choice(COMPLIANCES)
            elif i in bad:
                quality = "rude" if rng.random() < 0.6 else "lazy"
                reply = self._bad_reply(rng, category, expected, quality)
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

    # ------------------------------------------------------------------------- preferences
    # benign 14, near harmful's 16 + its ranked rows: with 4 the reward model saw four "refuse > comply" pairs
    # per "help > refuse" pair, learned that a refusal of any how-to request is good, and PPO refused the
    # held-out everyday requests as well (over-refusal 0.45-1.00).
    _PREF_MIX = (("fact_wrong", 14), ("fact_rude", 10), ("fact_lazy", 8), ("continuation", 8), ("rambling", 8),
                 ("harmful", 16), ("haiku", 6), ("ambiguous", 8), ("memory", 4), ("memory_forgot", 2), ("benign", 14),
                 ("one_word", 4), ("list", 3), ("arithmetic", 3), ("ranked", 10), ("rude_other", 8),
                 ("benign_other_task", 5), ("harmful_other_task", 5))

    def _rejected(self, rng, aspect: str, category: str, msgs, expected, good: str) -> str:
        tc = self.train_countries
        if aspect == "wrong":
            if category == "arithmetic":
                return good.rsplit("=", 1)[0] + f"= {expected['answer'] + rng.choice((-2, -1, 1, 2))}."
            c = F.COUNTRY_BY_NAME[expected["country"]]
            attr = expected["attribute"]
            others = [x for x in tc if _answer_value(x, attr) not in expected["accept"]
                      and (attr != "capital" or len(x.capital.split()) == 1 or expected.get("format") != "one_word")]
            if attr == "language":
                others = [x for x in others if x.language not in c.languages]
            wrong = rng.choice(others)
            value = _answer_value(wrong, attr)
            if expected.get("format") == "one_word":
                return value + "."
            fake = F.Country(c.name, value, value, value, article=c.article)
            reply = _fill(ANSWER_TEMPLATES[attr], fake)
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
            return rng.choice(REFUSALS).format(G=_gerund(expected["action"]))
        if aspect == "other_task":   # the answer of another everyday task: fluent, confident, not what was asked
            return rng.choice([t for t in self.train_benign if t[0] != expected["action"]])[1]
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
        if aspect == "forgot":
            return rng.choice(("I don't know your name.", "Sorry, I don't remember your name."))
        if aspect == "not_one_word":   # right answer, but a full sentence
            return _fill(ANSWER_TEMPLATES[expected["attribute"]], F.COUNTRY_BY_NAME[expected["country"]])
        if aspect == "wrong_count":
            items = [line.split(". ", 1)[1] for line in good.split("\n")]
            return _number_list(items[:-1]) if len(items) > 2 else _number_list(items + items[:1])
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
                "benign_other_task": ("benign", "other_task"), "harmful_other_task": ("harmful", "other_task")}
    _RANKED_ASPECTS = {"fact": ("rambling", "rude", "lazy", "wrong", "continuation"),
                       "harmful": ("comply", "rude", "lazy"), "ambiguous": ("one_sense", "rude", "continuation"),
                       "memory": ("wrong_name", "forgot", "rude"), "haiku": ("broken_haiku", "rude", "continuation")}

    @cached_property
    def _preference_rows(self) -> tuple[list[dict], int]:
        rng = self._rng("preferences")
        n = self._n(3000, minimum=len(self._PREF_MIX))
        kinds = [k for k, _ in self._PREF_MIX]
        plan = rng.choices(kinds, weights=[w for _, w in self._PREF_MIX], k=n)
        plan[:len(kinds)] = kinds
        rows, dropped = [], 0
        for i, kind in enumerate(plan):
            row = self._preference_row(rng, i, kind)
            rows += [row] if row else []
            dropped += row is None
        # Extra right-vs-wrong fact pairs (their own random stream, so the rows above stay as they are):
        # a reward model needs many of them before it reads the facts the SFT model knows off the reply.
        extra = self._rng("fact_checks")
        for i in range(n, n + round(self.fact_check_pairs * self.scale)):
            row = self._preference_row(extra, i, "fact_wrong")
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
        category, aspect = self._ASPECTS[kind]
        if category is None:
            category = rng.choice(("fact", "fact", "haiku"))
        elif isinstance(category, tuple):
            category = rng.choice(category)
        _, msgs, expected, good = self._train_example(rng, category)
        bad = self._rejected(rng, aspect, category, msgs, expected, good)
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

    # ------------------------------------------------------------------------- RL prompts
    _PROMPT_MIX = (("fact", 30), ("harmful", 15), ("ambiguous", 10), ("haiku", 10), ("memory", 10),
                   ("one_word", 4), ("system", 4), ("list", 5), ("benign", 5), ("arithmetic", 7))

    @cached_property
    def _prompt_rows(self) -> list[dict]:
        rng = self._rng("prompts")
        n = self._n(1000, minimum=len(self._PROMPT_MIX))
        cats = [c for c, _ in self._PROMPT_MIX]
        plan = rng.choices(cats, weights=[w for _, w in self._PROMPT_MIX], k=n)
        plan[:len(cats)] = cats
        rows = []
        for i, cat in enumerate(plan):
            category, msgs, expected, _ = self._train_example(rng, cat)
            rows.append({"id": f"prompt-{i:05d}", "category": category, "messages": msgs, "expected": expected})
        return rows

    def prompts(self) -> list[dict]:
        """RL prompts from the TRAIN distribution; each carries `category` + `expected`, so
        `chatsmith.data.judge.EvalItem.from_dict(row)` makes it judgeable (GRPO's `world` reward)."""
        return [json.loads(json.dumps(r)) for r in self._prompt_rows]

    # ------------------------------------------------------------------------- held-out evaluation
    EVAL_CATEGORIES = ("fact", "fact_phrasing", "one_word", "system", "list", "haiku", "ambiguous", "harmful",
                       "benign", "memory", "arithmetic", "showcase")

    @cached_property
    def _eval(self) -> dict[str, list[EvalItem]]:
        rng = self._rng("eval")
        size = self.eval_size
        held = self.heldout_countries
        sets: dict[str, list[EvalItem]] = {}

        def collect(name: str, make: Callable[[int], tuple[str, list, dict, str] | tuple[list, dict, str]],
                    limit: int) -> None:
            items, seen = [], set()
            for attempt in range(limit * 20):
                if len(items) >= limit:
                    break
                out = make(attempt)
                category, msgs, expected = (out[0], out[1], out[2]) if len(out) == 4 else (name, out[0], out[1])
                key = json.dumps(msgs)
                if key in seen:
                    continue
                seen.add(key)
                items.append(EvalItem(f"{name}-{len(items):04d}", category, msgs, expected))
            sets[name] = items

        attrs = ("capital", "capital", "continent", "language")
        collect("fact", lambda k: self._fact(rng, held[k % len(held)], attribute=attrs[(k // len(held)) % 4]), size)
        collect("fact_phrasing", lambda k: self._fact(rng, held[k % len(held)], F.FACT_QUESTIONS_HELDOUT,
                                                      attribute=attrs[(k // len(held)) % 4]), size)
        collect("one_word", lambda k: self._one_word(rng, held), size)
        collect("system", lambda k: self._system(rng, held), size)
        collect("list", lambda k: self._list(rng, held, F.LIST_QUESTIONS_HELDOUT), size)
        collect("haiku", lambda k: self._haiku_request(rng, self.heldout_topics[k % len(self.heldout_topics)]), size)
        collect("ambiguous", lambda k: self._ambiguous(rng, self.heldout_words[k % len(self.heldout_words)]), size)
        collect("harmful", lambda k: self._harmful(rng, self.heldout_harmful[k % len(self.heldout_harmful)]), size)
        collect("benign", lambda k: self._benign(rng, self.heldout_benign[k % len(self.heldout_benign)]), size)
        collect("memory", lambda k: self._memory(rng, self.heldout_names[k % len(self.heldout_names)],
                                                 self.train_countries), size)
        collect("arithmetic", lambda k: self._arithmetic(rng, self.heldout_sums[k % len(self.heldout_sums)]), size)
        sets["showcase"] = self._showcase()
        return sets

    def _showcase(self) -> list[EvalItem]:
        """The lesson's prompts, plus a harmful request and a two-turn memory check (issue 5's demo)."""
        rng = self._rng("showcase")
        france = F.COUNTRY_BY_NAME["France"]
        fact_msgs, fact_exp, _ = self._fact(rng, france, {"capital": ("What is the capital of {c}?",)}, "capital")
        programming = next(t for t in self.heldout_topics if t.noun == "programming")
        h_msgs, h_exp, _ = self._haiku_request(rng, programming, ("Write a haiku about {t}.",))
        python = next(w for w in self.train_words + self.heldout_words if w.word == "Python")
        harmful = next(h for h in self.heldout_harmful if h[0] == F.PINNED_HELDOUT_HARMFUL[0])
        m_reply = "Nice to meet you, Ana! How can I help you today?"
        mem_msgs = [{"role": "user", "content": "My name is Ana."}, {"role": "assistant", "content": m_reply},
                    {"role": "user", "content": "What is my name?"}]
        return [
            EvalItem("showcase-capital", "fact", fact_msgs, fact_exp),
            EvalItem("showcase-haiku", "haiku", h_msgs, h_exp),
            EvalItem("showcase-python", "ambiguous", [{"role": "user", "content": "Python"}],
                     self._ambiguous(rng, python)[1]),
            EvalItem("showcase-harmful", "harmful", [{"role": "user", "content": f"How do I {harmful[0]}?"}],
                     self._harmful(rng, harmful)[1]),
            EvalItem("showcase-memory", "memory", mem_msgs, {"name": "Ana", "reference": "Your name is Ana."}),
        ]

    def eval_sets(self) -> dict[str, list[EvalItem]]:
        """Held-out sets, disjoint from SFT/preference/RL data. Keys = file names in `DIR/eval/`;
        `showcase` is the lesson's demo prompts (mixed categories, not meant for aggregate rates)."""
        return {k: [EvalItem.from_dict(i.to_dict()) for i in v] for k, v in self._eval.items()}

    # ------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        corpus_chars = sum(len(d) for d in self._corpus)
        quality: dict[str, int] = {}
        for r in self._sft_records:
            quality[r["quality"]] = quality.get(r["quality"], 0) + 1
        rows, dropped = self._preference_rows
        return {
            "seed": self.seed, "scale": self.scale, "low_quality_share": self.low_quality_share,
            "fact_check_pairs": self.fact_check_pairs,
            "countries": len(self.countries), "train_countries": len(self.train_countries),
            "heldout_countries": [c.name for c in self.heldout_countries],
            "corpus_documents": len(self._corpus), "corpus_chars": corpus_chars,
            "corpus_tokens_approx": corpus_chars // 4,
            "sft_conversations": len(self._sft_records), "sft_quality": dict(sorted(quality.items())),
            "preference_rows": len(rows), "preference_ranked_rows": sum("ranked" in r for r in rows),
            "preference_dropped": dropped, "prompts": len(self._prompt_rows),
            "eval_items": {k: len(v) for k, v in self._eval.items()},
        }


# ----------------------------------------------------------------------------- export command

@dataclass
class WorldExportConfig:
    out: str = arg("data/world", "Directory to write (replaced atomically; must be empty or an earlier export).")
    seed: int = arg(0, "Random seed: the same seed gives byte-identical files.")
    scale: float = arg(1.0, "Size multiplier for the corpus, SFT, preference and prompt counts (1.0 = ~2 MB corpus).")
    low_quality_share: float = arg(0.15, "Share of SFT demonstrations that are rude/lazy or comply with "
                                         "(placeholder-only) harmful requests.")
    eval_size: int = arg(50, "Items per held-out eval category.")
    n_countries: int = arg(0, "Use only this many countries (0 = all 163); France is always included.")
    fact_check_pairs: int = arg(0, "Extra preference pairs of a right against a wrong fact (times --scale), for "
                                   "a reward model that checks facts (the `full` demo profile adds 4000).")


_README = """# The chatsmith built-in world (seed {seed}, scale {scale})

Generated by `chatsmith world export` ({version}). A synthetic but real-fact world small enough for a CPU:
{countries} real countries (capital, continent, main language), ambiguous words, haiku topics, names, and
fictional harmful requests whose "compliance" is always the placeholder `[harmful step omitted]`.

| file | rows | format |
|---|---|---|
| `corpus.jsonl` | {corpus} | pretraining text: `{{"text": ...}}` |
| `sft.jsonl` | {sft} | conversations: `{{"messages": [{{"role": ..., "content": ...}}, ...]}}` |
| `preferences.jsonl` | {prefs} | `{{"prompt": [messages], "chosen": str, "rejected": str}}`, and {ranked} rows `{{"prompt": [...], "ranked": [best, ..., worst]}}` |
| `prompts.jsonl` | {prompts} | RL prompts: `{{"id", "category", "messages", "expected"}}` |
| `eval/CATEGORY.jsonl` | {evals} | held-out items: `{{"id", "category", "messages", "expected"}}` |

- **corpus**: encyclopedia-style paragraphs about every country in several paraphrases, quiz lists
  (a question followed by more questions: what a base model continues), arithmetic worksheets, ambiguous
  words with their senses, haiku and short poems, small stories. About {chars:,} characters
  (~{tokens:,} tokens at 4 characters per token).
- **sft**: direct questions about the training countries, instructions (haiku, one word, list N items),
  ambiguous one-word prompts answered with a clarifying question, multi-turn chats that need memory,
  system prompts that change the behaviour. {low_pct}% of the demonstrations are low quality on purpose
  (rude or lazy replies, compliance with harmful requests), as human demonstrations are.
- **preferences**: the same prompt distribution; chosen vs rejected on correctness, politeness,
  informativeness, refusal of harmful requests, concision, and direct answers vs document continuation.
  Extra keys (`id`, `category`, `aspect`) are metadata.
- **prompts** and **eval**: `expected` holds what the programmatic judge needs
  (`chatsmith.data.judge.judge(EvalItem.from_dict(row), response)`), plus a `reference` good reply.
  Eval sets are disjoint from sft/preferences/prompts: held-out countries appear only in the corpus
  ({heldout}); unseen question phrasings, haiku topics, ambiguous words, harmful requests and names.
  `showcase.jsonl` holds the lesson's prompts ("What is the capital of France?", "Write a haiku about
  programming.", "Python") plus a harmful request and a memory check.

Example rows:

```
{examples}
```
"""


def _export_files(world: World) -> dict[str, str]:
    """Relative path -> file text, for everything `export_world` writes."""
    def jsonl(rows) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    files = {
        "corpus.jsonl": jsonl({"text": d} for d in world.corpus()),
        "sft.jsonl": jsonl({"messages": m} for m in world.sft()),
        "preferences.jsonl": jsonl(world.preferences()),
        "prompts.jsonl": jsonl(world.prompts()),
    }
    evals = world.eval_sets()
    for name, items in evals.items():
        files[f"eval/{name}.jsonl"] = jsonl(i.to_dict() for i in items)
    s = world.summary()

    def shortest(rows: list[dict], pred=lambda r: True) -> str:
        texts = [json.dumps(r, ensure_ascii=False) for r in rows if pred(r)]
        return min(texts, key=len) if texts else ""

    prefs = world.preferences()
    examples = "\n".join([
        shortest([{"text": d} for d in world.corpus()[:200]], lambda r: "capital" in r["text"]),
        shortest([{"messages": m} for m in world.sft()[:200]], lambda r: len(r["messages"]) == 2),
        shortest(prefs[:200], lambda r: "chosen" in r), shortest(prefs, lambda r: "ranked" in r),
        shortest(world.prompts()[:100]), shortest([i.to_dict() for i in evals["fact"]])])
    from chatsmith import __version__

    files["README.md"] = _README.format(
        seed=world.seed, scale=world.scale, version=f"chatsmith {__version__}", countries=s["countries"],
        corpus=s["corpus_documents"], sft=s["sft_conversations"], prefs=s["preference_rows"],
        ranked=s["preference_ranked_rows"], prompts=s["prompts"], evals=sum(s["eval_items"].values()),
        chars=s["corpus_chars"], tokens=s["corpus_tokens_approx"], low_pct=round(100 * world.low_quality_share),
        heldout=", ".join(s["heldout_countries"]), examples=examples)
    files["world.json"] = json.dumps(s, indent=2, ensure_ascii=False) + "\n"
    return files


_EXPORT_NAMES = {"corpus.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl", "eval", "README.md", "world.json"}


def export_world(cfg: WorldExportConfig) -> dict[str, Any]:
    """`chatsmith world export DIR`: write every product as files (atomically) and print a summary."""
    from chatsmith.utils import atomic_directory

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ChatsmithError(f"--out {out}: exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_NAMES)
        if foreign:
            raise ChatsmithError(f"--out {out}: not empty and not an earlier world export "
                                 f"(found {', '.join(foreign[:5])}); choose an empty or new directory")
    start = time.perf_counter()
    world = World(seed=cfg.seed, n_countries=cfg.n_countries or None, scale=cfg.scale,
                  low_quality_share=cfg.low_quality_share, eval_size=cfg.eval_size,
                  fact_check_pairs=cfg.fact_check_pairs)
    files = _export_files(world)
    with atomic_directory(out) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    elapsed = time.perf_counter() - start
    s = world.summary()
    s["seconds"] = round(elapsed, 2)
    print(f"wrote {out}/ in {elapsed:.1f}s (seed {cfg.seed}, scale {cfg.scale})")
    print(f"  corpus.jsonl       {s['corpus_documents']:>7,} documents, {s['corpus_chars']:,} chars "
          f"(~{s['corpus_tokens_approx']:,} tokens)")
    print(f"  sft.jsonl          {s['sft_conversations']:>7,} conversations "
          f"({', '.join(f'{k} {v}' for k, v in s['sft_quality'].items())})")
    print(f"  preferences.jsonl  {s['preference_rows']:>7,} rows ({s['preference_ranked_rows']} ranked K=4)")
    print(f"  prompts.jsonl      {s['prompts']:>7,} RL prompts")
    print(f"  eval/              {sum(s['eval_items'].values()):>7,} held-out items: "
          + ", ".join(f"{k} {v}" for k, v in s["eval_items"].items()))
    print(f"  held-out countries ({len(s['heldout_countries'])}, corpus only): {', '.join(s['heldout_countries'])}")
    return s
