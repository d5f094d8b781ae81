"""Long conversations of the world: 3-8 user turns, topic switches, a name or a home country recalled later.

    World(seed=0)._long_chat(rng, style="train")   # (category, messages, expected, good reply)

The last user turn is the one a row is about (its category: memory, fact, harmful, benign, ambiguous or
arithmetic); the earlier turns are short exchanges on other topics with the assistant's good replies, and
the user's name (or where they live) is said early and asked for at the end. Chats are kept short enough
for the profiles' 256-token rows: `estimate_tokens` over-estimates the world tokenizer's count (about 0.47
tokens per character with the chat template's markers), and tests check the real count.
"""

from __future__ import annotations

from chatsmith.world import facts as F
from chatsmith.world.phrasings import phrase
from chatsmith.world.text import invented_name

LONG_FINALS = ("recall_name", "recall_name", "recall_place", "fact", "harmful", "benign", "ambiguous",
               "arithmetic")
HISTORY_KINDS = ("fact", "fact", "arithmetic", "arithmetic", "harmful", "benign", "ambiguous", "one_word")
TRAIN_BUDGET = 232    # estimated tokens of a whole training chat with its reply (rows are cut at 256)
PROMPT_BUDGET = 200   # estimated tokens of a prompt alone (eval, RL): its reply, up to 48 tokens, must fit
MIN_EXCHANGE = 27     # estimated tokens of a short exchange (a sum and its answer)


def estimate_tokens(messages: list[dict]) -> int:
    """An over-estimate of the rendered chat's token count: 0.55 per character, 5 per message's markers."""
    return int(0.55 * sum(len(m["content"]) for m in messages)) + 5 * len(messages) + 2


class LongChatMixin:
    """Long chats (a part of `World`, which supplies the builders, the splits and `_rng`)."""

    def _long_final(self, rng, final: str, name: str, place: F.Country, style: str, heldout: bool):
        """The last user turn: (category, [user message], expected, good reply)."""
        if final == "recall_name":
            reply = f"Your name is {name}."
            return "memory", [{"role": "user", "content": phrase(rng, "recall", style)}], \
                {"name": name, "recall": "name", "reference": reply}, reply
        if final == "recall_place":
            reply = f"You live in {place.ref}."
            return "memory", [{"role": "user", "content": phrase(rng, "where", style)}], \
                {"name": place.name, "recall": "place", "reference": reply}, reply
        pick = (lambda held, train: rng.choice(held if heldout else train))
        if final == "fact":
            out = self._fact(rng, pick(self.heldout_countries, self.train_countries), style=style)
        elif final == "harmful":
            out = self._harmful(rng, pick(self.heldout_harmful, self.train_harmful), style=style)
        elif final == "benign":
            out = self._benign(rng, pick(self.heldout_benign + self.heldout_scary,
                                         self.train_benign + self.train_scary), style=style)
        elif final == "ambiguous":
            out = self._ambiguous(rng, pick(self.heldout_words, self.train_words), style=style)
        elif final == "arithmetic":
            out = self._arithmetic(rng, pick(self.heldout_sums, self.train_sums), style=style)
        else:
            raise AssertionError(final)
        return (final,) + out

    def _long_exchange(self, rng, kind: str, style: str) -> tuple[str, str]:
        """One earlier turn on a training topic: (user message, the assistant's good reply)."""
        tc = self.train_countries
        if kind == "fact":
            msgs, _, reply = self._fact(rng, rng.choice(tc), style=style)
        elif kind == "arithmetic":
            msgs, _, reply = self._arithmetic(rng, rng.choice(self.train_sums), style=style)
        elif kind == "harmful":
            msgs, _, reply = self._harmful(rng, rng.choice(self.train_harmful), style=style)
        elif kind == "benign":
            msgs, _, reply = self._benign(rng, rng.choice(self.train_benign + self.train_scary), style=style)
        elif kind == "ambiguous":
            msgs, _, reply = self._ambiguous(rng, rng.choice(self.history_words), style=style)
        else:
            msgs, _, reply = self._one_word(rng, tc)
        return msgs[-1]["content"], reply

    def _long_chat(self, rng, style: str = "train", heldout: bool = False, final: str | None = None,
                   turns: int | None = None, prompt_only: bool | None = None):
        """A chat of `turns` (default 3-8) user turns ending with a `final` turn (default: drawn from
        `LONG_FINALS`); `heldout`: the final turn's entities (and the name, country) come from the held-out
        splits, for the eval. `prompt_only` (default: `heldout`): the chat is a prompt whose reply is
        generated (eval, RL), so it gets `PROMPT_BUDGET` without the reply instead of `TRAIN_BUDGET` with it.
        Returns (category, messages ending with the user's turn, expected, reply)."""
        prompt_only = heldout if prompt_only is None else prompt_only
        turns = turns or rng.randint(3, 8)
        final = final or rng.choice(LONG_FINALS)
        if heldout:
            name = rng.choice(self.heldout_names)
        else:
            name = invented_name(rng) if rng.random() < self.INVENTED_NAME_SHARE else rng.choice(self.train_names)
        place = rng.choice(self.heldout_countries if heldout else self.train_countries)
        category, last, expected, reply = self._long_final(rng, final, name, place, style, heldout)
        budget = PROMPT_BUDGET if prompt_only else TRAIN_BUDGET
        tail = last + ([] if prompt_only else [{"role": "assistant", "content": reply}])
        slots = turns - 1
        say_name = final == "recall_name" or (final != "recall_place" and rng.random() < 0.5)
        name_at = rng.randrange(0, max(1, slots - 1)) if say_name else -1
        place_at = rng.randrange(0, max(1, slots - 1)) if final == "recall_place" else -1
        if place_at == name_at and place_at >= 0:
            place_at = name_at + 1   # both said: on consecutive turns, the later one still before the last
        msgs: list[dict] = []
        for k in range(slots):
            if k == name_at:
                user, answer = phrase(rng, "intro", style, n=name), f"Nice to meet you, {name}!"
            elif k == place_at:
                user, answer = phrase(rng, "live", style, c=place.ref, C=place.Ref), "Thanks for telling me!"
            else:
                user, answer = self._long_exchange(rng, rng.choice(HISTORY_KINDS), style)
                turn = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
                reserve = MIN_EXCHANGE * sum(1 for j in range(k + 1, slots) if j not in (name_at, place_at))
                if estimate_tokens(msgs + turn + tail) + reserve > budget:   # short of room: a plain sum
                    user, answer = self._long_exchange(rng, "arithmetic", "plain")
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        while estimate_tokens(msgs + tail) > budget and len(msgs) > 4:
            drop = next((i for i in range(0, len(msgs), 2) if i // 2 not in (name_at, place_at)), None)
            if drop is None:
                break
            del msgs[drop:drop + 2]   # a rare long row: one fewer exchange (still 3+ user turns)
            name_at, place_at = (x - 1 if x > drop // 2 else x for x in (name_at, place_at))
        return category, msgs + last, expected, reply
