"""Evaluation: the behaviour suite (`behaviour`), the judge/reward interface (`judges`), plots and reports.

    chatsmith eval runs/demo/base runs/demo/sft runs/demo/ppo --reward-model runs/demo/rm --out runs/demo/eval
    chatsmith eval runs/my-sft --suite items.jsonl --judge py:my_judges:judge --out runs/my-eval

Modules are imported lazily (matplotlib and torch are heavy), so `import chatsmith.eval` is cheap.
"""

from __future__ import annotations

CORE_METRICS = ("mean_reward", "kl_to_sft")
"""The metrics the eval computes itself, after the judge's: mean reward-model score, KL to the reference."""

__all__ = ["CORE_METRICS"]
