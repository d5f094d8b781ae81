"""chatsmith: turn a base language model into a chat assistant, and measure what each step changed.

Stages: chat templates with exact assistant-only loss masks (`chatsmith.chat`), data formats
(`chatsmith.data`), pretraining and SFT (`chatsmith.train`), reward model, PPO, DPO, GRPO and the
iterate loop, the KV-cache sampling engine (`chatsmith.generate`) and the base-vs-chat evaluation with
pluggable judges (`chatsmith.eval`). The built-in synthetic world, its judge and the demo are a plugin
(`chatsmith.world`) that the rest never imports. Run `chatsmith demo` for the whole journey on a CPU.
"""

__version__ = "0.1.0"
