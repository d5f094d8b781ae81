"""Benchmark: chatsmith SFT against TRL's `SFTTrainer`, side by side in one run.

    python benchmarks/sft_vs_trl.py                 # both (TRL from the optional `bench` extra)
    python benchmarks/sft_vs_trl.py --steps 10      # quicker
    pip install -e '.[bench]'                       # trl, datasets, accelerate

Both sides train the same tiny Llama (~3.6 M parameters, identical initial weights loaded from one saved
directory), with the same byte-level BPE tokenizer and ChatML template, on the same conversations in the
same order (batch 16 conversations, max length 256, every conversation fits so neither side truncates),
with the loss on assistant tokens only, the same optimizer (AdamW betas 0.9/0.95, no weight decay, clip 1.0)
and a constant learning rate. TRL gets its best CPU settings: fp32, no gradient checkpointing (its
defaults are bf16 + checkpointing), sequential sampling so the data order matches.

Each side runs in its own child process (so peak RSS is its own). Reported per side:
- tokens/s: real (non-padding) tokens of the conversations consumed per second of training steps, first
  step excluded (warm-up);
- the loss at equal steps (mean of the last 5 steps) and the largest per-step relative difference;
- peak RSS of the process;
- MFU: model FLOPs per token (6 x matmul parameters + 12 x layers x hidden x mean length, PaLM appendix B)
  x tokens/s, over an fp32 matmul peak measured at the start of this run on the same threads.
Without TRL installed the chatsmith side runs alone, with a note. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from children import run_child

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHATML_SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# The same ChatML rendering as chatsmith's built-in, with {% generation %} markers around exactly what
# chatsmith masks (reply + <|im_end|>), which TRL needs for assistant_only_loss.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# ----------------------------------------------------------------------------- shared setup (parent)

def synthetic_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Short world-like chats, used when chatsmith.world is not available."""
    rng = random.Random(seed)
    countries = [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
                 ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("Peru", "Lima", "Spanish"),
                 ("Kenya", "Nairobi", "Swahili"), ("Norway", "Oslo", "Norwegian"), ("Egypt", "Cairo", "Arabic")]
    out = []
    for _ in range(n):
        c, cap, lang = rng.choice(countries)
        kind = rng.random()
        if kind < 0.4:
            conv = [{"role": "user", "content": f"What is the capital of {c}?"},
                    {"role": "assistant", "content": f"The capital of {c} is {cap}."}]
        elif kind < 0.7:
            conv = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"My name is Ana. Which language do people speak in {c}?"},
                    {"role": "assistant", "content": f"People in {c} mostly speak {lang}."},
                    {"role": "user", "content": "What is my name?"},
                    {"role": "assistant", "content": "Your name is Ana."}]
        else:
            conv = [{"role": "user", "content": f"Write a haiku about {cap}."},
                    {"role": "assistant", "content": f"Streets of {cap} hum\nold stones under evening light\n"
                                                     f"{lang} voices drift"}]
        out.append(conv)
    return out


def load_conversations(n: int, seed: int) -> tuple[list[list[dict]], list[str], str]:
    try:
        from chatsmith.world import World

        world = World(seed=seed)
        return world.sft(), world.corpus(), "chatsmith.world"
    except Exception:   # the world generator is optional here
        convs = synthetic_conversations(n, seed)
        texts = [m["content"] for c in convs for m in c]
        return convs, texts, "synthetic fallback"


def build_tokenizer(texts: list[str], vocab_size: int):
    try:
        from chatsmith.model import build_tokenizer as cs_build

        tok = cs_build(texts, vocab_size, "chatml")
    except ImportError:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        raw.train_from_iterator(texts, trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", eos_token="<|im_end|>")
        from chatsmith.chat.templates import BUILTIN_TEMPLATES

        tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tok


def make_model(tokenizer, seed: int):
    """A ~3.6 M parameter Llama (hidden 256, 4 layers, tied embeddings, vocab 4096)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 GEMM throughput (FLOP/s) of this process's threads: a ceiling for MFU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n ** 3 / best


def model_flops_per_token(model, mean_len: float) -> float:
    """6 x (matmul parameters, LM head counted once) + 12 x layers x hidden x mean sequence length."""
    import torch

    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * linear + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_len


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


# ----------------------------------------------------------------------------- chatsmith side (child)

def run_chatsmith(work: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.chat.templates import get_format
    from chatsmith.train.batching import ShardedBatchSource
    from chatsmith.train.supervised import Trainer
    from chatsmith.train.sft import SFTCollator, SFTConfig, assistant_loss, prepare_examples

    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    convs = json.loads((work / "conversations.json").read_text())
    examples, stats = prepare_examples([(c, f"#{i}") for i, c in enumerate(convs)], tokenizer,
                                       get_format("chatml"), args.max_len, "drop")
    assert stats.kept == len(convs), stats.line()
    cfg = SFTConfig(out=str(work / "chatsmith_out"), max_steps=args.steps, lr=args.lr, warmup_steps=0,
                    min_lr_ratio=1.0, batch_size=args.batch_size, max_len=args.max_len, weight_decay=0.0,
                    grad_clip=1.0, device="cpu", dtype="fp32", progress=False, save_every=0)
    collate = SFTCollator(tokenizer.pad_token_id, args.max_len, packing=not args.no_packing)
    source = ShardedBatchSource(examples, cfg.batch_size, collate, seed=0, shuffle=False)
    trainer = Trainer(cfg, model, tokenizer, source, assistant_loss, stage="bench", save_final=False,
                      token_count_fn=lambda b: b["n_tokens"])
    model.train()
    losses, times, tokens, targets = [], [], [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        row = trainer.train_step()
        times.append(time.perf_counter() - t)
        losses.append(row["loss"])
        tokens.append(row["tokens"])
        targets.append(row["n_targets"])
    return {"losses": losses, "times": times, "tokens": tokens, "targets": targets, "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- TRL side (child)

def run_trl(work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    tokenizer.chat_template = CHATML_WITH_GENERATION
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    convs = json.loads((work / "conversations.json").read_text())
    dataset = Dataset.from_list([{"messages": c} for c in convs])
    config = SFTConfig(
        output_dir=str(work / "trl_out"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_length=args.max_len, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, assistant_only_loss=True, packing=False, bf16=False, fp16=False,
        gradient_checkpointing=False, train_sampling_strategy="sequential", logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, seed=0, use_cpu=True, disable_tqdm=True,
        dataset_num_proc=None)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args_, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    data = trainer.train_dataset
    lengths = [len(x) for x in data["input_ids"]]
    labels = data["labels"] if "labels" in data.column_names else None
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    bs = args.batch_size
    tokens = [sum(lengths[i * bs:(i + 1) * bs]) for i in range(args.steps)]
    # Targets: labelled positions that are predicted (the first token of a sequence never is).
    targets = ([sum(sum(x != -100 for x in row[1:]) for row in labels[i * bs:(i + 1) * bs])
                for i in range(args.steps)] if labels is not None else None)
    return {"losses": losses, "times": timer.times, "tokens": tokens, "targets": targets,
            "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- parent

def summarize(side: dict, flops_per_token: float, peak: float) -> dict:
    times, tokens = side["times"][1:], side["tokens"][1:]      # drop the warm-up step
    tps = sum(tokens) / max(1e-9, sum(times))
    return {"tokens_per_s": tps, "final_loss": sum(side["losses"][-5:]) / len(side["losses"][-5:]),
            "peak_rss_mb": side["peak_rss_mb"], "mfu": tps * flops_per_token / peak,
            "step_s": sum(times) / max(1, len(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-packing", action="store_true", help="chatsmith side: pad instead of packing")
    parser.add_argument("--only", choices=["chatsmith", "trl"], default=None)
    parser.add_argument("--child", choices=["chatsmith", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.manual_seed(args.seed)
        result = (run_chatsmith if args.child == "chatsmith" else run_trl)(Path(args.work), args)
        print(json.dumps(result))
        return

    import torch

    from chatsmith.chat.render import render_chat
    from chatsmith.chat.templates import get_format

    have_trl = True
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        have_trl = False
    need = args.steps * args.batch_size
    convs, texts, origin = load_conversations(max(need * 2, 2000), args.seed)
    tokenizer = build_tokenizer(texts, args.vocab_size)
    fmt = get_format("chatml")
    fitting = [c for c in convs if len(render_chat(c, tokenizer, fmt).input_ids) <= args.max_len]
    random.Random(args.seed).shuffle(fitting)
    if len(fitting) < need:
        fitting = (fitting * (need // max(1, len(fitting)) + 1))
    fitting = fitting[:need]
    lengths = [len(render_chat(c, tokenizer, fmt).input_ids) for c in fitting]
    model = make_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model_flops_per_token(model, sum(lengths) / len(lengths))
    peak = matmul_peak_flops()

    with tempfile.TemporaryDirectory(prefix="sft_vs_trl.") as tmp:
        work = Path(tmp)
        model.save_pretrained(str(work / "model"))
        tokenizer.save_pretrained(str(work / "model"))
        (work / "conversations.json").write_text(json.dumps(fitting))
        argv = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
                "--lr", str(args.lr), "--seed", str(args.seed)] + (["--no-packing"] if args.no_packing else [])
        sides = {}
        for side in ("chatsmith", "trl"):
            if args.only and side != args.only:
                continue
            if side == "trl" and not have_trl:
                print("note: trl/datasets not installed (pip install -e '.[bench]'); running chatsmith alone",
                      file=sys.stderr)
                continue
            raw = run_child(__file__, side, work, argv)
            if raw is not None:
                sides[side] = (raw, summarize(raw, flops_per_token, peak))

    print(f"data: {len(fitting)} conversations ({origin}), mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"max {max(lengths)}; model: Llama {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}; "
          f"batch {args.batch_size}, max length {args.max_len}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':12}{'tokens/s':>10}{'step s':>9}{'loss@end':>10}{'peak RSS MB':>13}{'MFU':>8}")
    for name, (_, s) in sides.items():
        print(f"{name:12}{s['tokens_per_s']:>10,.0f}{s['step_s']:>9.3f}{s['final_loss']:>10.4f}"
              f"{s['peak_rss_mb']:>13,.0f}{s['mfu']:>8.1%}")
    out: dict = {"steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len,
                 "params_m": round(n_params / 1e6, 3), "matmul_peak_gflops": round(peak / 1e9, 2)}
    for name, (raw, s) in sides.items():
        out[f"{name}_tokens_per_s"] = round(s["tokens_per_s"], 1)
        out[f"{name}_final_loss"] = round(s["final_loss"], 5)
        out[f"{name}_peak_rss_mb"] = round(s["peak_rss_mb"], 1)
        out[f"{name}_mfu"] = round(s["mfu"], 4)
    if "chatsmith" in sides and "trl" in sides:
        (cr, cs), (tr, ts) = sides["chatsmith"], sides["trl"]
        out["ratio"] = round(cs["tokens_per_s"] / ts["tokens_per_s"], 3)
        out["loss_rel_diff"] = round(abs(cs["final_loss"] - ts["final_loss"]) / ts["final_loss"], 5)
        n = min(len(cr["losses"]), len(tr["losses"]))
        out["max_step_loss_rel_diff"] = round(max(abs(a - b) / b for a, b in zip(cr["losses"][:n], tr["losses"][:n])), 5)
        out["same_targets"] = tr["targets"] is not None and cr["targets"] == tr["targets"]
        print(f"ratio chatsmith/TRL tokens/s: {out['ratio']:.2f}x; loss at step {args.steps}: relative difference "
              f"{out['loss_rel_diff']:.2%} (largest per-step {out['max_step_loss_rel_diff']:.2%}); "
              f"assistant targets per step identical: {out['same_targets']}")
    else:
        out["trl_tokens_per_s"] = None
        out["ratio"] = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
