"""`chatsmith pretrain`: train a byte-level BPE tokenizer and a base model from scratch (next-token loss).

    chatsmith world export data/
    chatsmith pretrain --data data/corpus.jsonl --preset tiny --out runs/base
    chatsmith generate runs/base --prompt "The capital of France is"

Data: any text file `chatsmith.data.formats.load_examples(kind="text")` reads (JSONL/JSON/Parquet rows with
a `text` field, ...). Every document is tokenized, followed by `<|endoftext|>` (else the eos token), and all documents are
concatenated into one stream that is cut into rows of `--max-len` tokens (GPT-2/GPT-3 style packing).
Rows cross document boundaries on purpose: no padding is wasted and the end-of-text token teaches the model
where a document stops; attention may see the previous document's tail, which is harmless for a base model.
A held-out share of documents (`--eval-fraction`) gives an eval loss.

The model starts from transformers' initialisation (`--init standard`, the default). `--init induction` plants
two circuits the tiny preset does not learn on its own at a small budget (the demo asks for them): head 0 of
layer 0 attends to the previous token (`chatsmith.planted.plant_previous_token_head`), and three heads of layer 1
are induction heads that copy the token that followed an earlier occurrence of the current one
(`chatsmith.planted.plant_induction_head`). Their wiring is listed in config.json; a run with `--freeze-planted`
(this one or any later stage's) keeps it as it is. `--init prev-token` plants only the first.

The tokenizer reserves the special tokens of `--template` (default chatml) so a later `chatsmith sft` needs
no embedding resize. Output: `OUT/` is a standard Hugging Face model directory (config.json,
model.safetensors, tokenizer files with `chat_template`), plus `metrics.jsonl` and `checkpoint/`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatsmith.config import arg, validate_config
from chatsmith.errors import ChatsmithError, DataError
from chatsmith.model import INITS
from chatsmith.train.batching import ShardedBatchSource
from chatsmith.train.config import TrainConfig
from chatsmith.train.run import TrainResult
from chatsmith.train.supervised import Trainer, evaluate_loss, lm_loss_on_targets
from chatsmith.utils import is_main_process, rank, set_seed, world_size


@dataclass
class PretrainConfig(TrainConfig):
    data: str = arg("data/corpus.jsonl", "Text corpus (JSONL/JSON/Parquet with a `text` field).")
    preset: str = arg("tiny", "Model size preset (chatsmith.model.PRESETS): tiny or small.")
    template: str = arg("chatml", "Chat format whose special tokens the tokenizer reserves and whose "
                                  "chat_template the saved tokenizer carries.")
    vocab_size: int = arg(0, "Tokenizer vocabulary size (0 = the preset's, else 4096).", min=0)
    init: str = arg("standard", "Weight initialisation: standard (transformers' own), prev-token (then head 0 of "
                                "layer 0 set to attend to the previous token: chatsmith.planted."
                                "plant_previous_token_head) or induction (prev-token, plus three induction heads in "
                                "layer 1 that copy the token after an earlier occurrence of the current one: "
                                "chatsmith.planted.plant_induction_head; add --freeze-planted to keep their "
                                "wiring fixed).", choices=INITS)
    eval_fraction: float = arg(0.02, "Share of documents held out for the eval loss.", min=0, max=1, max_exclusive=True)
    eval_batches: int = arg(8, "Batches of held-out rows scored at each evaluation.", min=1)
    out: str = arg("runs/base", "Output directory (HF model dir + metrics.jsonl + checkpoint/).")
    max_steps: int = arg(160, "Optimizer steps (batch_size x max_len tokens each; 160 = ~1.7 epochs of the world).")
    lr: float = arg(2e-3, "Peak learning rate (AdamW); a 3-5 M model tolerates 1e-3 to 3e-3.")
    warmup_steps: int = arg(20, "Linear warmup steps.")
    batch_size: int = arg(16, "Rows of --max-len tokens per micro-batch.")
    max_len: int = arg(256, "Tokens per training row.")
    save_every: int = arg(100, "Checkpoint every N steps.")

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this)."""
        super().check_settings()
        if self.lora_r:
            raise ChatsmithError(f"--lora-r {self.lora_r}: pretraining trains every weight of a new model; LoRA "
                                 "is for sft, reward, dpo, ppo, grpo and rlhf")


def read_corpus(path: str) -> list[str]:
    """Documents of a text corpus via chatsmith.data.formats (bad rows are errors that name file:line)."""
    from chatsmith.data.formats import load_examples

    result = load_examples(path, kind="text")
    texts = [ex.text for ex in result.examples if ex.text.strip()]
    if is_main_process():
        print(result.summary(), file=sys.stderr)
    if not texts:
        raise DataError(f"{path}: every document is empty")
    return texts


def split_documents(texts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/eval split of whole documents (no eval when the corpus is tiny or fraction is 0)."""
    n_eval = int(round(len(texts) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval == 0 or len(texts) - n_eval < 1:
        return texts, []
    chosen = set(np.random.default_rng([seed, 7]).permutation(len(texts))[:n_eval].tolist())
    return ([t for i, t in enumerate(texts) if i not in chosen], [t for i, t in enumerate(texts) if i in chosen])


def pack_stream(texts: list[str], tokenizer, max_len: int) -> torch.Tensor:
    """Tokenize, append the end-of-text token, concatenate, and cut into rows of ``max_len + 1`` tokens.

    Returns ``(n_rows, max_len + 1)`` long; row ``r`` holds inputs ``[:, :-1]`` and shifted targets
    ``[:, 1:]``. Consecutive rows share one token so every token of the stream is a target exactly once.
    """
    eos = document_separator_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for ids in encoded for t in (*ids, eos)), dtype=np.int64)
    n_rows = (len(stream) - 1) // max_len
    if n_rows < 1:
        raise DataError(f"the corpus has {len(stream)} tokens, fewer than one row of --max-len {max_len} + 1")
    starts = np.arange(n_rows)[:, None] * max_len + np.arange(max_len + 1)[None, :]
    return torch.from_numpy(stream[starts])


def document_separator_id(tokenizer) -> int:
    """``<|endoftext|>`` when the vocabulary has it (chat end-of-turn tokens stay reserved for chat), else eos."""
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(sep, int) and sep != tokenizer.unk_token_id and sep is not None:
        return sep
    if tokenizer.eos_token_id is None:
        raise ChatsmithError("the tokenizer has neither <|endoftext|> nor an eos token to separate documents")
    return tokenizer.eos_token_id


def _collate_rows(rows: list[torch.Tensor]) -> dict:
    x = torch.stack(rows)
    return {"input_ids": x[:, :-1], "targets": x[:, 1:], "n_targets": x[:, 1:].numel()}


def next_token_loss(model, batch):
    """Summed next-token loss over a batch of full rows (every position is a target)."""
    loss_sum, n = lm_loss_on_targets(model, batch["input_ids"], batch["targets"])
    return loss_sum, n, {}


def pretrain(cfg: PretrainConfig) -> TrainResult:
    validate_config(cfg)              # every setting, before any work (Python callers too)
    from chatsmith.model import PRESETS, build_tokenizer, create_model

    if cfg.preset not in PRESETS:
        raise ChatsmithError(f"--preset: unknown preset {cfg.preset!r}; expected one of {', '.join(PRESETS)}")
    set_seed(cfg.seed)
    texts = read_corpus(cfg.data)
    train_texts, eval_texts = split_documents(texts, cfg.eval_fraction, cfg.seed)

    saved_tok = Path(cfg.out) / "checkpoint" / "tokenizer"
    if cfg.resume and saved_tok.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(saved_tok))   # the exact tokenizer of the interrupted run
    else:
        vocab = cfg.vocab_size or int(PRESETS[cfg.preset].get("vocab_size", 4096))
        tokenizer = build_tokenizer(train_texts, vocab, cfg.template)
    set_seed(cfg.seed)   # model init must not depend on whether the tokenizer was trained or loaded
    model = create_model(cfg.preset, tokenizer, init=cfg.init)
    model.float()

    rows = pack_stream(train_texts, tokenizer, cfg.max_len)
    eval_rows = pack_stream(eval_texts, tokenizer, cfg.max_len) if eval_texts else None
    source = ShardedBatchSource(rows, cfg.batch_size, _collate_rows, seed=cfg.seed, drop_last=True)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world_size() * cfg.max_len
    if is_main_process():
        print(f"pretrain: {len(train_texts)} documents, {rows.numel():,} tokens in {len(rows)} rows of "
              f"{cfg.max_len}; vocab {len(tokenizer)}; model {n_params / 1e6:.2f} M parameters; "
              f"{cfg.max_steps} steps x {tokens_per_step:,} tokens = "
              f"{cfg.max_steps * tokens_per_step / max(1, rows.numel()):.2f} epochs", file=sys.stderr)

    eval_fn = None
    if eval_rows is not None and len(eval_rows) >= world_size():
        # The same held-out rows whatever the number of processes: --eval-batches global batches, rank r
        # scores every W-th of them, and evaluate_loss sums losses and counts over the ranks. Every rank
        # gets as many rows (FSDP ranks must run the same number of forward passes).
        n_eval = min(len(eval_rows), cfg.eval_batches * cfg.batch_size * world_size()) // world_size() * world_size()
        mine = eval_rows[rank():n_eval:world_size()]
        batches = [_collate_rows(list(mine[i:i + cfg.batch_size])) for i in range(0, len(mine), cfg.batch_size)]

        def eval_fn(model):
            loss = evaluate_loss(model, batches, next_token_loss)
            return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    trainer = Trainer(cfg, model, tokenizer, source, next_token_loss, eval_fn=eval_fn, stage="pretrain")
    result = trainer.run()
    if is_main_process():
        print(result.done_line("pretrain"), file=sys.stderr)
    return result
