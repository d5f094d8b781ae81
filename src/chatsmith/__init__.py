"""chatsmith: turn a base language model into a chat assistant, and measure what each step changed.

Stages: chat templates with exact assistant-only loss masks (`chatsmith.chat`), data formats and the
built-in synthetic world (`chatsmith.data`), pretraining and SFT (`chatsmith.train`), reward model,
PPO, DPO, GRPO and the iterate loop, the KV-cache sampling engine (`chatsmith.generate`) and the
base-vs-chat evaluation (`chatsmith.eval`). Run `chatsmith demo` for the whole journey on a CPU.
"""

__version__ = "0.1.0"
