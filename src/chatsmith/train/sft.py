"""`chatsmith sft`: supervised fine-tuning on conversations, with the loss on assistant tokens only.

    chatsmith sft --model runs/base --data data/sft.jsonl --template chatml --out runs/sft
    chatsmith chat runs/sft

What happens:
1. Conversations are read with `chatsmith.data.formats.load_examples(kind="chat")` (messages, ShareGPT,
   Alpaca, prompt/completion; bad rows reported with file:line) and rendered with
   `chatsmith.chat.render.render_chat`, which gives the token ids and the exact assistant mask (reply tokens
   and the end-of-turn token closing each reply, so the model learns to stop).
2. Over-length conversations (> `--max-len`) are truncated after the last assistant turn that fits
   (`--overlength truncate`) or dropped (`--overlength drop`); the counts are printed.
3. A micro-batch is `--batch-size` conversations. With `--packing` (default) they are packed best-fit into
   rows of at most `--max-len` tokens with position ids restarting at 0 per conversation and a
   block-diagonal causal attention mask, so no conversation sees another and no compute goes to padding.
   Packing changes only the layout, not the maths: the loss equals the unpacked loss of the same batch.
4. The loss is the sum of the cross-entropies of all assistant tokens of the whole accumulated batch
   divided by their number (the Trainer's normalisation, `chatsmith.train.supervised`), and the LM head is applied
   only at positions whose next token is an assistant token (`lm_loss_on_targets`).

The result in `OUT/` is a standard HF model directory whose tokenizer carries the chat template used here
(with `--lora-r R`: a peft adapter directory, see `chatsmith.train.lora`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from chatsmith.config import arg, validate_config
from chatsmith.data.packing import pack_sequences
from chatsmith.data.rules import require_rows
from chatsmith.errors import ChatsmithError, TemplateError
from chatsmith.model import EMBEDDING_MODES, TRAIN_EMBEDDINGS_HELP, restrict_embedding_training
from chatsmith.train.batching import ShardedBatchSource
from chatsmith.train.config import TrainConfig, check_epochs_or_steps
from chatsmith.train.lora import apply_lora, lora_enabled
from chatsmith.train.neftune import add_neftune
from chatsmith.train.run import TrainResult
from chatsmith.train.supervised import Trainer, evaluate_loss, lm_loss_on_targets
from chatsmith.utils import is_main_process, set_seed


@dataclass
class SFTConfig(TrainConfig):
    model: str = arg("runs/base", "Model directory to fine-tune (any local HF causal LM).")
    data: str = arg("data/sft.jsonl", "Conversations (messages / ShareGPT / Alpaca / prompt-completion).")
    template: str | None = arg(None, "Chat format: chatml, chatml-space (a space before each user "
                                     "message), llama2, alpaca, jinja, or a .jinja file (default: the model's "
                                     "own chat_template).")
    format: str | None = arg(None, "Data format override (default: auto-detected).")
    on_bad_row: str = arg("error", "What to do with invalid rows.", choices=["error", "skip"])
    overlength: str = arg("truncate", "Conversations longer than --max-len: truncate at a turn boundary "
                                      "or drop.", choices=["truncate", "drop"])
    packing: bool = arg(True, "Pack the conversations of a micro-batch into rows (no padding compute).")
    epochs: float = arg(0.0, "If > 0, train this many epochs (overrides --max-steps).", min=0)
    eval_fraction: float = arg(0.05, "Share of conversations held out for the eval loss (at most 256).",
                               min=0, max=1, max_exclusive=True)
    out: str = arg("runs/sft", "Output directory (HF model dir + metrics.jsonl + checkpoint/).")
    max_steps: int = arg(300, "Optimizer steps.", min=0)
    lr: float = arg(1e-3, "Peak learning rate (AdamW).")
    warmup_steps: int = arg(20, "Linear warmup steps.")
    batch_size: int = arg(16, "Conversations per micro-batch.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    save_every: int = arg(100, "Checkpoint every N steps.")
    train_embeddings: str = arg("seen", TRAIN_EMBEDDINGS_HELP, choices=list(EMBEDDING_MODES))
    neftune_noise_alpha: float = arg(0.0, "NEFTune: uniform noise of this size on the input embeddings while "
                                          "training (Jain et al. 2023; the paper uses 5); 0 = off.", min=0)
    pretrain_data: str | None = arg(None, "Pretraining text (any file `chatsmith pretrain --data` reads) mixed into "
                                          "the training examples with the loss on every token, so the model keeps "
                                          "what it read while it learns to chat (InstructGPT's pretraining mix).")
    pretrain_mix: float = arg(0.2, "With --pretrain-data: the share of training examples that are pretraining "
                                   "documents.", min=0, max=1, max_exclusive=True)

    def check_settings(self) -> None:
        """Cross-setting rules (`chatsmith.config.validate_config` calls this)."""
        super().check_settings()
        check_epochs_or_steps(self)


@dataclass
class SFTExample:
    """One rendered conversation: ``input_ids`` (t,) and ``targets`` (t,), where ``targets[j]`` is the
    assistant token that follows position ``j`` (-100 elsewhere)."""
    input_ids: torch.Tensor
    targets: torch.Tensor
    origin: str


def shift_mask_to_targets(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """``targets[j] = input_ids[j+1]`` where ``loss_mask[j+1] == 1``, else -100 (the last position: -100)."""
    return [input_ids[j + 1] if loss_mask[j + 1] else -100 for j in range(len(input_ids) - 1)] + [-100]


@dataclass
class PrepareStats:
    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    no_assistant: int = 0
    tokens: int = 0
    targets: int = 0

    def line(self) -> str:
        return (f"{self.kept} conversations kept, {self.truncated} truncated at a turn boundary, "
                f"{self.dropped_long} dropped as over-length, {self.no_assistant} without assistant tokens; "
                f"{self.tokens:,} tokens, {self.targets:,} assistant (loss) tokens")


def prepare_examples(conversations: Sequence[tuple], tokenizer, fmt, max_len: int,
                     overlength: str = "truncate") -> tuple[list[SFTExample], PrepareStats]:
    """Render ``(messages, origin)`` or ``(messages, origin, tools)`` tuples to :class:`SFTExample` and apply
    the length policy (``tools``: the row's function schemas, `chatsmith.data.tools`)."""
    from chatsmith.chat.render import render_chat
    from chatsmith.data.formats import fit_to_length

    stats = PrepareStats()
    out: list[SFTExample] = []
    for messages, origin, *tools in conversations:
        try:
            rendered = render_chat(messages, tokenizer, fmt, tools=tools[0] if tools else None)
        except TemplateError as exc:
            raise TemplateError(f"{origin}: {exc}") from None
        fit = fit_to_length(rendered.input_ids, rendered.assistant_mask, None, max_len, overlength)
        if fit.status == "dropped":
            stats.dropped_long += 1
            continue
        stats.truncated += fit.status == "truncated"
        targets = shift_mask_to_targets(fit.input_ids, fit.loss_mask)
        n_targets = sum(t != -100 for t in targets)
        if n_targets == 0:
            stats.no_assistant += 1
            continue
        out.append(SFTExample(torch.tensor(fit.input_ids, dtype=torch.long),
                              torch.tensor(targets, dtype=torch.long), origin))
        stats.kept += 1
        stats.tokens += len(fit.input_ids)
        stats.targets += n_targets
    return out, stats


class SFTCollator:
    """Turns a list of :class:`SFTExample` into a micro-batch dict.

    Keys: ``input_ids`` (b, t), ``targets`` (b, t) (-100 = no loss), ``position_ids`` (b, t) restarting at 0
    per conversation, ``attention_mask`` (b, 1, t, t) bool block-diagonal causal, or None when every row holds
    one conversation (right padding + the plain causal mask is then exact and takes SDPA's fast path),
    ``n_targets`` and ``n_tokens`` (ints; real tokens, padding excluded). ``t`` is the longest row.
    """

    def __init__(self, pad_id: int, max_len: int, packing: bool = True):
        self.pad_id, self.max_len, self.packing = int(pad_id), int(max_len), packing

    def __call__(self, examples: list[SFTExample]) -> dict[str, Any]:
        lengths = [len(ex.input_ids) for ex in examples]
        bins = pack_sequences(lengths, self.max_len) if self.packing else [[i] for i in range(len(examples))]
        t = max(sum(lengths[i] for i in b) for b in bins)
        b = len(bins)
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        targets = torch.full((b, t), -100, dtype=torch.long)
        position_ids = torch.zeros((b, t), dtype=torch.long)
        seq_ids = torch.full((b, t), -1, dtype=torch.long)
        for r, members in enumerate(bins):
            pos = 0
            for s, i in enumerate(members):
                n = lengths[i]
                input_ids[r, pos:pos + n] = examples[i].input_ids
                targets[r, pos:pos + n] = examples[i].targets
                position_ids[r, pos:pos + n] = torch.arange(n)
                seq_ids[r, pos:pos + n] = s
                pos += n
        mask = None
        if any(len(m) > 1 for m in bins):
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            # Padding (seq id -1) attends to padding only, so no row of the mask is empty (no NaN in SDPA).
            mask = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal
            mask = mask[:, None]
        return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids,
                "attention_mask": mask, "n_targets": int((targets != -100).sum()), "n_tokens": sum(lengths)}


def assistant_loss(model, batch):
    """Summed cross-entropy over assistant tokens; the head runs only at those positions."""
    loss_sum, n = lm_loss_on_targets(model, batch["input_ids"], batch["targets"], batch["position_ids"],
                                     batch["attention_mask"])
    return loss_sum, n, {}


def document_examples(texts: Sequence[str], tokenizer, max_len: int, origin: str) -> list[SFTExample]:
    """Pretraining documents as examples with the loss on every token: ``ids`` = the document's tokens and the
    end-of-text token, cut to ``max_len``; ``targets[j] = ids[j + 1]`` (the last position: -100)."""
    from chatsmith.train.pretrain import document_separator_id

    sep = document_separator_id(tokenizer)
    out = []
    for i, text in enumerate(texts):
        ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [sep])[:max_len]
        if len(ids) >= 2:
            out.append(SFTExample(torch.tensor(ids, dtype=torch.long), torch.tensor(ids[1:] + [-100], dtype=torch.long),
                                  f"{origin}: document {i + 1}"))
    return out


def pretraining_mix(cfg: SFTConfig, n_chats: int, tokenizer) -> list[SFTExample]:
    """``--pretrain-mix`` of the training examples drawn from ``--pretrain-data`` (without replacement while
    the corpus lasts), so that mixed examples / all examples = pretrain_mix for ``n_chats`` conversations."""
    from chatsmith.train.pretrain import read_corpus

    texts = read_corpus(cfg.pretrain_data)
    want = round(n_chats * cfg.pretrain_mix / (1 - cfg.pretrain_mix))
    if want == 0:
        return []
    rng = np.random.default_rng([cfg.seed, 13])
    order = np.concatenate([rng.permutation(len(texts)) for _ in range(-(-want // len(texts)))])[:want]
    return document_examples([texts[i] for i in order], tokenizer, cfg.max_len, cfg.pretrain_data)


def split_conversations(items: list, eval_fraction: float, seed: int, cap: int = 256) -> tuple[list, list]:
    n_eval = min(cap, int(round(len(items) * eval_fraction))) if eval_fraction > 0 else 0
    if n_eval == 0 or len(items) - n_eval < 1:
        return items, []
    chosen = set(np.random.default_rng([seed, 11]).permutation(len(items))[:n_eval].tolist())
    return ([x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen])


def load_conversations(cfg: SFTConfig) -> list[tuple[list[dict], str, list[dict] | None]]:
    """``(messages, origin, tools)`` of every conversation in ``--data``."""
    from chatsmith.data.formats import load_examples

    result = load_examples(cfg.data, format=cfg.format, on_bad_row=cfg.on_bad_row, kind="chat")
    if is_main_process():
        print(result.summary(), file=sys.stderr)
    return [(ex.messages, ex.origin, ex.tools) for ex in result.examples]


def sft(cfg: SFTConfig) -> TrainResult:
    validate_config(cfg)              # every setting, before any work (Python callers too)
    from chatsmith.chat.templates import get_format
    from chatsmith.model import load_model

    set_seed(cfg.seed)
    loaded = load_model(cfg.model, device="cpu", template=cfg.template)
    model, tokenizer = loaded.model, loaded.tokenizer
    fmt = get_format(cfg.template, tokenizer) if cfg.template else loaded.fmt
    tokenizer.chat_template = fmt.template      # the saved model carries the format it was trained on
    model.float()
    stop_ids = fmt.stop_token_ids(tokenizer)
    if stop_ids and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    if tokenizer.pad_token_id is None:
        raise ChatsmithError(f"{cfg.model}: the tokenizer has no pad token (load_model should have added one)")

    conversations = load_conversations(cfg)
    train_convs, eval_convs = split_conversations(conversations, cfg.eval_fraction, cfg.seed)
    train, stats = prepare_examples(train_convs, tokenizer, fmt, cfg.max_len, cfg.overlength)
    evals, _ = prepare_examples(eval_convs, tokenizer, fmt, cfg.max_len, cfg.overlength)
    if is_main_process():
        print(f"sft: train: {stats.line()}; eval: {len(evals)} conversations", file=sys.stderr)
    require_rows(train, cfg.data, "no conversation left to train on", stats.line())
    if cfg.pretrain_data and cfg.pretrain_mix > 0:
        documents = pretraining_mix(cfg, len(train), tokenizer)
        train = train + documents
        if is_main_process():
            n_tok = sum(len(ex.input_ids) for ex in documents)
            print(f"sft: mixed in {len(documents):,} documents of {cfg.pretrain_data} ({n_tok:,} tokens, all trained)",
                  file=sys.stderr)
    if lora_enabled(cfg):          # adapters only; the embeddings stay frozen
        model = apply_lora(model, cfg, base=cfg.model)
    else:
        restrict_embedding_training(model, tokenizer, fmt, cfg.train_embeddings,
                                    seen_ids=torch.unique(torch.cat([ex.input_ids for ex in train])).tolist())

    if cfg.neftune_noise_alpha > 0:
        add_neftune(model, cfg.neftune_noise_alpha)

    collate = SFTCollator(tokenizer.pad_token_id, cfg.max_len, cfg.packing)
    source = ShardedBatchSource(train, cfg.batch_size, collate, seed=cfg.seed)
    if cfg.epochs > 0:
        cfg = replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * source.batches_per_epoch / cfg.grad_accum)))
        if is_main_process():
            print(f"sft: --epochs {cfg.epochs} = {cfg.max_steps} steps", file=sys.stderr)

    eval_fn = None
    if evals:
        eval_batches = [collate(evals[i:i + cfg.batch_size]) for i in range(0, len(evals), cfg.batch_size)]

        def eval_fn(model):
            return {"eval_loss": evaluate_loss(model, eval_batches, assistant_loss)}

    trainer = Trainer(cfg, model, tokenizer, source, assistant_loss, eval_fn=eval_fn, stage="sft",
                      token_count_fn=lambda batch: batch["n_tokens"])
    result = trainer.run()
    if is_main_process():
        print(result.done_line("sft"), file=sys.stderr)
    return result
