"""Training stages. One loop runs them all: `run.Run` owns resume, logging, evaluation, samples, checkpoints and
the final save; a stage supplies its step (`supervised.Trainer` for pretrain, sft, reward and dpo; `ppo` and
`grpo` a rollout then minibatch updates; `rlhf` composes reward and ppo). The shared pieces: `config`
(TrainConfig), `optim`, `batching`, `checkpoint`, `devices`, `parallel`, `progress`. Each stage lives in its own
module and is imported only when its command runs."""
