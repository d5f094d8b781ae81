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


class SuiteMixin:
    """The world's RL prompts and held-out evaluation sets (a part of `World`, which supplies the splits)."""

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
        `chatsmith.world.judge.EvalItem.from_dict(row)` makes it judgeable (GRPO's `world` reward)."""
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

