"""The world's RL prompts and held-out evaluation sets (judged by `chatsmith.world.judge`).

    World(seed=0).prompts()      # RL prompts {id, category, messages, expected}
    World(seed=0).eval_sets()    # {set name: [EvalItem]}
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Callable

from chatsmith.world import facts as F
from chatsmith.world.judge import EvalItem
from chatsmith.world.longchat import LONG_FINALS


class SuiteMixin:
    """The world's RL prompts and held-out evaluation sets (a part of `World`, which supplies the splits)."""

    # ------------------------------------------------------------------------- RL prompts
    _PROMPT_MIX = (("fact", 30), ("harmful", 15), ("ambiguous", 10), ("haiku", 10), ("memory", 10),
                   ("one_word", 4), ("system", 4), ("list", 5), ("benign", 10), ("arithmetic", 7), ("long", 10))

    @cached_property
    def _prompt_rows(self) -> list[dict]:
        rng = self._data_rng("prompts")
        n = self._n(1000, minimum=len(self._PROMPT_MIX))
        cats = [c for c, _ in self._PROMPT_MIX]
        plan = rng.choices(cats, weights=[w for _, w in self._PROMPT_MIX], k=n)
        plan[:len(cats)] = cats
        streams = {cat: self._data_rng(f"prompts:{cat}") for cat in cats}   # one per category (see `_sft_records`)
        rows = []
        for i, cat in enumerate(plan):
            if cat == "long":   # a prompt: its reply is sampled, so the chat alone must leave room for it
                category, msgs, expected, _ = self._long_chat(streams[cat], "train", prompt_only=True)
            else:
                category, msgs, expected, _ = self._train_example(streams[cat], cat)
            rows.append({"id": f"prompt-{i:05d}", "category": category, "messages": msgs, "expected": expected})
        return rows

    def prompts(self) -> list[dict]:
        """RL prompts from the TRAIN distribution; each carries `category` + `expected`, so
        `chatsmith.world.judge.EvalItem.from_dict(row)` makes it judgeable (GRPO's `world` reward)."""
        return [json.loads(json.dumps(r)) for r in self._prompt_rows]

    # ------------------------------------------------------------------------- held-out evaluation
    EVAL_CATEGORIES = ("fact", "fact_phrasing", "one_word", "system", "list", "haiku", "ambiguous", "harmful",
                       "benign", "memory", "arithmetic", "showcase")
    HELDOUT_PHRASING_SETS = ("fact", "harmful", "benign", "ambiguous", "memory", "haiku", "list", "arithmetic")
    """Categories with a `heldout_<category>` set: held-out entities in held-out wordings (`phrasings.HELDOUT`),
    marked `expected["slice"] = "heldout"`, so the eval reports them as `heldout_*` rates beside the suite's."""

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
        # Everyday requests worded with a scary verb ("kill a frozen program"): part of over_refusal.
        collect("benign_scary", lambda k: ("benign",) + self._benign(rng, self.heldout_scary[k % len(self.heldout_scary)]),
                size)
        # 3-8 user turns (the eval reports every rate by the depth of the reply: turn 1, 2-3, 4+).
        long_rng = self._rng("eval_long")
        collect("long", lambda k: self._long_chat(long_rng, "plain", heldout=True, turns=3 + k % 6,
                                                  final=LONG_FINALS[k // 6 % len(LONG_FINALS)]), size)
        self._heldout_phrasing_sets(sets, collect)
        sets["showcase"] = self._showcase()
        return sets

    def _heldout_phrasing_sets(self, sets: dict, collect: Callable) -> None:
        """The `heldout_*` sets (own random stream, so the sets above stay as they were)."""
        rng = self._rng("eval_heldout_phrasings")
        size = max(1, self.eval_size * 2 // 5)
        held, style = self.heldout_countries, "heldout"
        attrs = ("capital", "capital", "continent", "language")
        benign = self.heldout_benign + self.heldout_scary
        makers = {
            "fact": lambda k: self._fact(rng, held[k % len(held)], attribute=attrs[(k // len(held)) % 4], style=style),
            "harmful": lambda k: self._harmful(rng, self.heldout_harmful[k % len(self.heldout_harmful)], style=style),
            "benign": lambda k: self._benign(rng, benign[k % len(benign)], style=style),
            "ambiguous": lambda k: self._ambiguous(rng, self.heldout_words[k % len(self.heldout_words)], style=style),
            "memory": lambda k: self._memory(rng, self.heldout_names[k % len(self.heldout_names)],
                                             self.train_countries, style=style),
            "haiku": lambda k: self._haiku_request(rng, self.heldout_topics[k % len(self.heldout_topics)],
                                                   style=style),
            "list": lambda k: self._list(rng, held, style=style),
            "arithmetic": lambda k: self._arithmetic(rng, self.heldout_sums[k % len(self.heldout_sums)], style=style),
        }
        for category in self.HELDOUT_PHRASING_SETS:
            make = makers[category]

            def tagged(k, make=make, category=category):
                msgs, expected, reply = make(k)
                return category, msgs, {**expected, "slice": "heldout"}, reply
            collect(f"heldout_{category}", tagged, size)

    def _showcase(self) -> list[EvalItem]:
        """The lesson's prompts, plus a harmful request and a two-turn memory check."""
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

