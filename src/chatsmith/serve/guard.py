"""The optional safety layer of `chatsmith serve --guard RM_DIR --guard-threshold T`: a reward model scores
each chat reply, and a reply scored below T is replaced by a refusal.

    chatsmith serve runs/demo/ppo --guard runs/demo/rm --guard-threshold -1.0

The score is the reward model's normalised score of the whole conversation ending with the reply (mean 0,
std 1 over its SFT samples, see `chatsmith.reward_model`), so T is in standard deviations. The guard can
only judge a whole reply, so a guarded request is answered once its replies are complete: streaming
requests get the role chunk at once, then each choice's text (or the refusal) in one chunk, its finish
reason ("content_filter" when refused), usage if asked and `[DONE]`. A refusal never shows any of the
reply it replaces. `/v1/completions` (raw text) is refused with 403 on a guarded server: the reward
model judges replies in a conversation, and an unguarded route would bypass the guard. Each judged reply
counts in /metrics: `chatsmith_guard_replies_total{model, outcome="passed"|"refused"}`.

Tests: `python -m pytest tests/test_serve_guard.py -q`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from chatsmith.errors import ChatsmithError

__all__ = ["Guard", "DEFAULT_REFUSAL"]

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class Verdict:
    """The guard's answer for one reply: the text to send, whether it was refused, the score."""

    text: str
    refused: bool
    score: float


class Guard:
    """A loaded reward model, the threshold and the refusal text; `check` is safe to call from threads."""

    def __init__(self, path: str, threshold: float, refusal: str = DEFAULT_REFUSAL, device: str = "auto"):
        from chatsmith.model import max_context_length
        from chatsmith.reward_model import load_reward_model

        if not math.isfinite(threshold):
            raise ChatsmithError(f"--guard-threshold: expected a finite number, got {threshold}")
        if not refusal.strip():
            raise ChatsmithError("--guard-refusal: give the text a refused reply is replaced by")
        try:
            self.rm = load_reward_model(path, device=device)
        except ChatsmithError as exc:
            message = str(exc)
            raise ChatsmithError("--guard " + (message if message.startswith(str(path)) else f"{path}: {message}")) \
                from None
        self.path, self.threshold, self.refusal = str(path), float(threshold), refusal
        self.context = max_context_length(self.rm.model, self.rm.tokenizer)
        self.lock = threading.Lock()      # one scoring at a time: the model is shared by request threads

    def scores(self, messages: list[dict[str, str]], replies: list[str]) -> list[float]:
        """The reward model's normalised score of each reply to ``messages``."""
        from chatsmith.reward_model import score_conversations

        conversations = [list(messages) + [{"role": "assistant", "content": r}] for r in replies]
        with self.lock:
            # longer conversations lose their start (the reply and its end-of-turn are kept)
            return score_conversations(self.rm, conversations=conversations, max_len=self.context).tolist()

    def check(self, messages: list[dict[str, str]], replies: list[str]) -> list[Verdict]:
        """Each reply, or the refusal where its score is below the threshold."""
        return [Verdict(self.refusal, True, s) if s < self.threshold else Verdict(r, False, s)
                for r, s in zip(replies, self.scores(messages, replies))]
