"""Training stages. `loop.py` holds the shared machinery (config, optimizer, schedule, checkpoints, Trainer);
each stage lives in its own module (`pretrain`, `sft`, `reward`, `dpo`, `ppo`, `grpo`, `rlhf`) and is
imported only when its command runs."""
