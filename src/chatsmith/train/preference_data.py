"""Preference data for the training stages (`chatsmith reward`, `chatsmith dpo`): their shared flags,
the train / held-out split, and tokenisation into prefix trees (each prompt shared by its responses).

    cfg = RewardConfig(...)                                   # a PreferenceConfig
    train_examples, eval_examples = load_preference_split(cfg)
    cfg, train_tok, eval_tok = tokenize_preference_split(cfg, train_examples, eval_examples, tokenizer, fmt,
                                                         stage="reward")
    train_tok.trees                                           # list[PrefixTree], one per example

Both stages hold out the same examples of the same file (`chatsmith.data.formats.split_train_eval`).

Run the tests: `python -m pytest tests/test_reward.py tests/test_dpo.py -q`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from chatsmith.config import arg
from chatsmith.data.formats import load_preferences, split_train_eval
from chatsmith.data.rules import require_rows, sequences_fit
from chatsmith.errors import ChatsmithError, DataError
from chatsmith.reward_model import render_for_scoring
from chatsmith.train.config import TrainConfig, check_epochs_or_steps, steps_for_epochs
from chatsmith.train.preference_functional import PrefixTree, prefix_tree
from chatsmith.utils import note

__all__ = ["PreferenceConfig", "TokenizedPreferences", "tokenize_preferences", "load_preference_split",
           "tokenize_preference_split", "dropped_line"]


@dataclass
class PreferenceConfig(TrainConfig):
    """Flags every preference stage shares; `RewardConfig` and `DPOConfig` add their own."""

    data: str = arg("data/preferences.jsonl", "Preference data: prompt + chosen/rejected, or a ranked list.")
    template: str | None = arg(None, "Chat format if the model has none: chatml, llama2, alpaca or a .jinja path.")
    eval_data: str | None = arg(None, "Held-out preference file (default: hold out --eval-fraction of --data).")
    eval_fraction: float = arg(0.05, "Fraction of --data held out (a deterministic split, the same in `reward` "
                               "and `dpo`).", min=0, max=1, max_exclusive=True)
    on_bad_row: str = arg("error", "What to do with a malformed data row: error (name it and stop) or skip.",
                          choices=["error", "skip"])
    epochs: float = arg(1.0, "Passes over the training pairs when --max-steps is 0.", min=0)
    max_steps: int = arg(0, "Optimizer steps (0 = --epochs passes over the data).", min=0)
    warmup_steps: int = arg(5, "Linear warmup steps.")
    batch_size: int = arg(16, "Preference examples (pairs or rankings) per micro-batch.")
    max_len: int = arg(256, "Maximum tokens of one conversation (prompt + response); an example with a longer "
                       "one is dropped whole (never cut).")
    share_prompt: bool = arg(True, "Compute each example's shared prompt once (tree packing); same result.")
    eval_every: int = arg(0, "Evaluate on the held-out examples every N steps (0 = only at the end).")
    save_every: int = arg(50, "Write OUT/checkpoint every N steps (0 = only at the end).")
    log_every: int = arg(5, "Write a metrics row every N steps.")

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this)."""
        super().check_settings()
        check_epochs_or_steps(self)


@dataclass
class TokenizedPreferences:
    trees: list[PrefixTree]
    origins: list[str]
    n_dropped: int            # examples with a conversation longer than max_len (dropped whole, never cut)
    n_pairs: int
    kept: list[int] = dataclasses.field(default_factory=list)   # index in the input of each tree's example


def tokenize_preferences(examples: Sequence[Any], tokenizer: Any, fmt: Any, max_len: int,
                         share_prompt: bool = True, with_masks: bool = False) -> TokenizedPreferences:
    """Render every response of every `PreferenceExample` and build its prefix tree (prompt shared once).

    An example any of whose conversations (prompt + response, up to its end-of-turn) is longer than
    `max_len` tokens is dropped whole (`chatsmith.data.rules.sequences_fit`). `with_masks` keeps each
    conversation's response mask (DPO needs which tokens to sum log-probs over).
    """
    trees, origins, kept, dropped, pairs = [], [], [], 0, 0
    for index, ex in enumerate(examples):
        origin = getattr(ex, "origin", "?")
        if len(ex.responses) < 2:
            raise DataError(f"{origin}: a preference example needs at least 2 responses, got {len(ex.responses)}")
        seqs, masks = [], []
        for k, response in enumerate(ex.responses):
            if not isinstance(response, str):
                raise DataError(f"{origin}: response {k} must be a string, got {type(response).__name__}")
            messages = list(ex.prompt) + [{"role": "assistant", "content": response}]
            try:
                ids, mask, _ = render_for_scoring(messages, tokenizer, fmt, None, where=f"{origin} response {k}")
            except DataError:
                raise
            except ChatsmithError as exc:
                raise DataError(f"{origin}: {exc}") from None
            seqs.append(ids)
            masks.append(mask)
        if not sequences_fit([len(ids) for ids in seqs], max_len):
            dropped += 1
            continue
        trees.append(prefix_tree(seqs, masks if with_masks else None, share=share_prompt))
        origins.append(origin)
        kept.append(index)
        pairs += len(ex.responses) * (len(ex.responses) - 1) // 2
    return TokenizedPreferences(trees, origins, dropped, pairs, kept)


def dropped_line(stage: str, n_dropped: int, max_len: int) -> str:
    """What the stage tells the user about the examples `tokenize_preferences` dropped."""
    return (f"{stage}: dropped {n_dropped} preference example(s) with a prompt + response longer than --max-len "
            f"{max_len} tokens (whole examples are dropped, never cut)")


def load_preference_split(cfg: PreferenceConfig) -> tuple[list[Any], list[Any]]:
    """`(train, held-out)` PreferenceExamples: `--eval-data` when given, else the deterministic
    `--eval-fraction` split of `--data`."""
    examples = load_preferences(cfg.data, "--data", cfg.on_bad_row)
    if cfg.eval_data:
        return examples, load_preferences(cfg.eval_data, "--eval-data", cfg.on_bad_row)
    train_idx, eval_idx = split_train_eval(len(examples), cfg.eval_fraction, seed=0)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


def tokenize_preference_split(cfg: PreferenceConfig, train_examples: Sequence[Any], eval_examples: Sequence[Any],
                              tokenizer: Any, fmt: Any, stage: str, with_masks: bool = False,
                              detail: str = "") -> tuple[PreferenceConfig, TokenizedPreferences,
                                                         TokenizedPreferences]:
    """Tokenize both splits and say so on stderr; returns `cfg` with `max_steps` resolved from `--epochs`
    when it is 0. `detail` ends the summary line (e.g. ", beta 0.1")."""
    train_tok = tokenize_preferences(train_examples, tokenizer, fmt, cfg.max_len, cfg.share_prompt, with_masks)
    eval_tok = tokenize_preferences(eval_examples, tokenizer, fmt, cfg.max_len, cfg.share_prompt, with_masks)
    if train_tok.n_dropped or eval_tok.n_dropped:
        note(dropped_line(stage, train_tok.n_dropped + eval_tok.n_dropped, cfg.max_len))
    require_rows(train_tok.trees, cfg.data, f"no preference example fits in --max-len {cfg.max_len} tokens",
                 f"{train_tok.n_dropped} dropped as longer")
    if cfg.max_steps <= 0:
        cfg = dataclasses.replace(cfg, max_steps=steps_for_epochs(len(train_tok.trees), cfg, cfg.epochs))
    note(f"{stage}: {len(train_tok.trees)} training examples ({train_tok.n_pairs} pairs), "
         f"{len(eval_tok.trees)} held out ({eval_tok.n_pairs} pairs); {cfg.max_steps} steps{detail}")
    return cfg, train_tok, eval_tok
