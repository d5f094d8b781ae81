"""Text generation: the batched, KV-cached sampling engine and the two commands built on it.

    from chatsmith.generate import SamplingConfig, generate, stream, Generator
    out = generate(model, tokenizer, [ids_a, ids_b], SamplingConfig(temperature=0.7, top_p=0.9, seed=1))
    for piece in stream(model, tokenizer, ids_a, SamplingConfig(max_new_tokens=64)):
        print(piece, end="", flush=True)

    chatsmith generate runs/base --prompt "The capital of Veldoria is"   # raw completion (cli.py)
    chatsmith chat runs/sft                                               # terminal chat (terminal.py)

Modules: `engine` (SamplingConfig, Generator, generate, stream: the sampling loop), `decoders` (the
next-token logits backends: a fast Llama-family step and the generic Hugging Face forward), `continuous`
(continuous batching, shared by `chatsmith serve` and the RL rollouts: `ContinuousBatch`,
`generate_continuous`), `batch` (its KV-cache batch that rows join and leave), `row_sampling` (per-row
temperature / top-p / top-k / seed), `text`
(token bytes, stop strings, printable text), `cli` (`chatsmith generate`), `terminal` (`chatsmith chat`).
"""

from chatsmith.generate.decoders import clear_weight_cache
from chatsmith.generate.engine import (GenerationOutput, Generator, SamplingConfig, chat_sampling_config,
                                       distinct_rows, generate, stream)

__all__ = ["SamplingConfig", "GenerationOutput", "Generator", "generate", "stream", "chat_sampling_config",
           "clear_weight_cache", "distinct_rows"]
