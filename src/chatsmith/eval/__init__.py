"""Evaluation: the held-out behaviour suite (`behaviour`), its plots (`plots`) and reports (`report`).

    chatsmith eval runs/demo/base runs/demo/sft runs/demo/ppo --reward-model runs/demo/rm --out runs/demo/eval

Modules are imported lazily (matplotlib and torch are heavy), so `import chatsmith.eval` is cheap.
"""

from __future__ import annotations

METRICS = ("answers_directly", "fact_accuracy", "ends_turn", "follows_instruction", "asks_clarification",
           "refuses_harmful", "rude", "memory", "mean_reward", "kl_to_sft")
"""Every metric a report holds per model, in display order. All but the last two are rates in [0, 1]."""

__all__ = ["METRICS"]
