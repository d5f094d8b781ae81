"""The world's sentence pools and small text helpers (paraphrases, names, decks, splits).

    from chatsmith.world.text import CAPITAL_SENTENCES, invented_name, shuffled_deck, draw

Used by the generators in `chatsmith.world` (corpus, conversations, preferences, suite).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from chatsmith.world import facts as F

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
POOLS = {"capital": CAPITAL_SENTENCES, "continent": CONTINENT_SENTENCES, "language": LANGUAGE_SENTENCES}

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
NAME_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
                "kr", "st", "tr")
NAME_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "au")
NAME_ENDINGS = ("", "", "", "n", "l", "r", "s")
KNOWN_NAMES = {n.lower() for n in F.NAMES}


def invented_name(rng: random.Random) -> str:
    """A pronounceable made-up name ("Draveno", "Kisal") that is never one of `facts.NAMES`."""
    while True:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(NAME_ONSETS) + rng.choice(NAME_VOWELS) for _ in range(syllables))
        name = (name + rng.choice(NAME_ENDINGS)).capitalize()
        if name.lower() not in KNOWN_NAMES:
            return name


def fill(template: str, c: F.Country, **extra: Any) -> str:
    return template.format(c=c.ref, C=c.Ref, cap=c.capital, cont=c.continent, lang=c.language, **extra)


def answer_value(c: F.Country, attribute: str) -> str:
    return {"capital": c.capital, "continent": c.continent, "language": c.language}[attribute]


def accepted(c: F.Country, attribute: str) -> list[str]:
    return list({"capital": c.capitals, "continent": (c.continent,), "language": c.languages}[attribute])


def pick_sentence(rng: random.Random, pool: tuple[str, ...]) -> str:
    """The first (SFT answer) form 3x as often as each other paraphrase."""
    return rng.choices(pool, weights=[3] + [1] * (len(pool) - 1))[0]


def number_list(items: list[str]) -> str:
    return "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))


def shuffled_deck(rng: random.Random, items) -> Iterator:
    """Endless shuffled passes over `items`: every item is drawn once per pass, so a few hundred documents
    cover every one of a few dozen items (random sampling would leave some out at small scales)."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def draw(deck: Iterator, k: int) -> list:
    """k distinct items from a deck (a pass boundary can repeat an item: it is skipped)."""
    out: list = []
    while len(out) < k:
        item = next(deck)
        if item not in out:
            out.append(item)
    return out


GERUND_EXCEPTIONS = {"tie": "tying", "lie": "lying", "die": "dying", "get": "getting", "put": "putting",
                      "cut": "cutting", "run": "running", "swim": "swimming", "sit": "sitting", "stop": "stopping",
                      "plan": "planning", "shop": "shopping", "set": "setting", "dig": "digging"}


def gerund(action: str) -> str:
    """'make a kite' -> 'Making a kite' (the subject of a refusal: "{G} can hurt people ...")."""
    verb, _, rest = action.partition(" ")
    ing = GERUND_EXCEPTIONS.get(verb)
    if ing is None:
        ing = (verb[:-1] if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")) else verb) + "ing"
    return f"{ing.capitalize()} {rest}".rstrip()


def join_and(items: list[str]) -> str:
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


def seeded_split(rng: random.Random, items: list, fraction: float, pinned_heldout=(), pinned_train=(),
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


