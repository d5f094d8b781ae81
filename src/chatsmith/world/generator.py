"""The built-in world: a seeded generator of everything the embedded demo trains and evaluates on.

    from chatsmith.world import World
    w = World(seed=0)                 # scale=1.0: ~2 MB corpus, 4,000 SFT chats, 3,000 preference rows
    w.corpus()       -> list[str]             pretraining documents
    w.sft()          -> list[list[dict]]      conversations (a configurable share is low quality)
    w.preferences()  -> list[dict]            {"prompt", "chosen", "rejected"} or {"prompt", "ranked"}
    w.prompts()      -> list[dict]            RL prompts {"id", "category", "messages", "expected"}
    w.eval_sets()    -> dict[str, list[EvalItem]]   held-out, judged by chatsmith.world.judge

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

Deterministic: the same arguments give byte-identical output. Each product has its own seeded RNG, and within
SFT, preferences and RL prompts each category (or kind of pair) has its own: a change to how one category is
written leaves the other categories' rows byte-identical, so two runs that differ in it are paired on the rest.
"""

from __future__ import annotations

import random
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.world import facts as F
from chatsmith.world.extra_words import EXTRA_TRAIN_WORDS
from chatsmith.world.conversations import ConversationMixin
from chatsmith.world.corpus import CorpusMixin
from chatsmith.world.longchat import LongChatMixin
from chatsmith.world.phrasings import SCARY_BENIGN_TASKS
from chatsmith.world.preferences import PreferenceMixin
from chatsmith.world.suite import SuiteMixin
from chatsmith.world.text import AmbiguousWord, Sense, Topic, seeded_split


class World(CorpusMixin, ConversationMixin, LongChatMixin, PreferenceMixin, SuiteMixin):
    """The seeded synthetic world (see the module docstring). Products are computed once and cached."""

    def __init__(self, seed: int = 0, n_countries: int | None = None, scale: float = 1.0,
                 low_quality_share: float = 0.15, eval_size: int = 50, heldout_fraction: float = 0.2,
                 fact_check_pairs: int = 0, helpful_pairs: int = 0, extra_words: bool = False,
                 titled_word_pages: bool = False, data_seed: int = 0):
        if not 0.0 <= low_quality_share <= 0.9:
            raise ChatsmithError(f"low_quality_share: expected a share in [0, 0.9], got {low_quality_share}")
        if not 0.0 < scale <= 20.0:
            raise ChatsmithError(f"scale: expected a number in (0, 20], got {scale}")
        if not 0.05 <= heldout_fraction <= 0.5:
            raise ChatsmithError(f"heldout_fraction: expected a share in [0.05, 0.5], got {heldout_fraction}")
        if data_seed < 0:
            raise ChatsmithError(f"data_seed: expected 0 or more, got {data_seed}")
        if eval_size < 1:
            raise ChatsmithError(f"eval_size: expected at least 1, got {eval_size}")
        if fact_check_pairs < 0:
            raise ChatsmithError(f"fact_check_pairs: expected 0 or more, got {fact_check_pairs}")
        if helpful_pairs < 0:
            raise ChatsmithError(f"helpful_pairs: expected 0 or more, got {helpful_pairs}")
        if n_countries is not None and not 10 <= n_countries <= len(F.COUNTRIES):
            raise ChatsmithError(f"n_countries: expected 10..{len(F.COUNTRIES)} (or none for all), got {n_countries}")
        self.seed, self.scale, self.low_quality_share = seed, scale, low_quality_share
        self.eval_size, self.heldout_fraction = eval_size, heldout_fraction
        self.fact_check_pairs, self.helpful_pairs = fact_check_pairs, helpful_pairs
        self.extra_words, self.titled_word_pages = extra_words, titled_word_pages
        self.data_seed = data_seed

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
        self.train_countries, self.heldout_countries = seeded_split(
            rng, countries, heldout_fraction, F.PINNED_HELDOUT_COUNTRIES, tuple(echo), key=lambda c: c.name)

        topics = [Topic(*t) for t in F.HAIKU_TOPICS]
        self.train_topics, self.heldout_topics = seeded_split(rng, topics, 0.25, F.PINNED_HELDOUT_TOPICS,
                                                        key=lambda t: t.noun)
        def as_words(table):
            return [AmbiguousWord(w, tuple(Sense(*s) for s in senses)) for w, senses in table]

        words = as_words(F.AMBIGUOUS_WORDS)
        self.train_words, self.heldout_words = seeded_split(rng, words, 0.25, (), F.PINNED_TRAIN_WORDS,
                                                      key=lambda w: w.word)
        # Earlier turns of long chats keep to the split's words, so the eval's long chats stay as they were.
        self.history_words = list(self.train_words)
        if extra_words:
            self.train_words += as_words(EXTRA_TRAIN_WORDS)
        self.train_harmful, self.heldout_harmful = seeded_split(rng, list(F.HARMFUL_ACTIONS), 0.3,
                                                          F.PINNED_HELDOUT_HARMFUL, key=lambda h: h[0])
        self.train_benign, self.heldout_benign = seeded_split(rng, list(F.BENIGN_TASKS), 0.25, key=lambda b: b[0])
        self.train_names, self.heldout_names = seeded_split(rng, list(F.NAMES), 0.25, F.PINNED_HELDOUT_NAMES)
        pairs = [(a, b, op) for op in "+-" for a in range(21) for b in range(21) if op == "+" or a >= b]
        self.train_sums, self.heldout_sums = seeded_split(rng, pairs, 0.15)
        # Its own stream, so the splits above (and the corpus, which reads them) stay as they were.
        self.train_scary, self.heldout_scary = seeded_split(self._rng("scary"), list(SCARY_BENIGN_TASKS), 0.3,
                                                            key=lambda b: b[0])

    # ------------------------------------------------------------------------- helpers
    def _rng(self, name: str) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
        return random.Random(f"chatsmith-world:{self.seed}:{name}")

    def _data_rng(self, name: str) -> random.Random:
        """The stream of a training-data product (SFT, preferences, RL prompts): `data_seed` draws those rows
        again while the splits, the corpus (so the base model) and the eval stay as they are; 0 is `_rng`."""
        return self._rng(name) if self.data_seed == 0 else self._rng(f"data{self.data_seed}:{name}")

    def _n(self, base: int, minimum: int = 1) -> int:
        return max(minimum, round(base * self.scale))


    # ------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        corpus_chars = sum(len(d) for d in self._corpus)
        quality: dict[str, int] = {}
        for r in self._sft_records:
            quality[r["quality"]] = quality.get(r["quality"], 0) + 1
        rows, dropped = self._preference_rows
        return {
            "seed": self.seed, "data_seed": self.data_seed, "scale": self.scale, "low_quality_share": self.low_quality_share,
            "fact_check_pairs": self.fact_check_pairs, "helpful_pairs": self.helpful_pairs,
            "extra_words": self.extra_words, "titled_word_pages": self.titled_word_pages,
            "countries": len(self.countries), "train_countries": len(self.train_countries),
            "heldout_countries": [c.name for c in self.heldout_countries],
            "corpus_documents": len(self._corpus), "corpus_chars": corpus_chars,
            "corpus_tokens_approx": corpus_chars // 4,
            "sft_conversations": len(self._sft_records), "sft_quality": dict(sorted(quality.items())),
            "preference_rows": len(rows), "preference_ranked_rows": sum("ranked" in r for r in rows),
            "preference_dropped": dropped, "prompts": len(self._prompt_rows),
            "eval_items": {k: len(v) for k, v in self._eval.items()},
        }




def eval_suite(seed: int = 0) -> tuple[list, list]:
    """`chatsmith eval --suite world`: (the held-out items of every set, the showcase items) of the world
    with `seed` and default sizes. The core reaches it by the spec in `chatsmith.eval.judges.BUILTIN_SUITES`."""
    sets = World(seed=seed).eval_sets()
    items = [item for name, group in sets.items() if name != "showcase" for item in group]
    return items, sets.get("showcase", [])
