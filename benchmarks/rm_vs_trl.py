"""Benchmark: chatsmith reward-model training against TRL's `RewardTrainer`, side by side in one run.

    python benchmarks/rm_vs_trl.py                 # both sides (TRL from the optional `bench` extra)
    python benchmarks/rm_vs_trl.py --steps 10      # quicker
    from rm_vs_trl import run_rm_bench             # -> {"chatsmith_rm_pairs_per_s", "trl_rm_pairs_per_s",
                                                   #     "rm_ratio", ...}   (used by rl_vs_trl.py)

Both sides train the same reward model: the tiny Llama of `sft_vs_trl.py` (~3.6 M parameters, same
byte-level BPE tokenizer and ChatML template) with a scalar head, identical initial weights loaded from one
saved `AutoModelForSequenceClassification` directory; on the same preference pairs, pre-tokenised once
by chatsmith (prompt + response up to its end-of-turn token; TRL gets them as `chosen_ids`/`rejected_ids`,
so neither side tokenises), in the same order (TRL: sequential sampling), batch 16 pairs, max length 256
(every pair fits, so neither truncates nor filters), loss `-logsigmoid(r_c - r_r)` averaged over pairs,
the same optimizer (AdamW betas 0.9/0.95, eps 1e-8, no weight decay, clip 1.0) and a constant learning
rate. TRL gets its best CPU settings: fp32, no gradient checkpointing (its defaults are bf16 +
checkpointing). chatsmith runs its `reward` stage as shipped (prompt shared by chosen and rejected in a
packed tree batch, see `train/preference_functional.py`).

Each side runs in its own child process. Reported per side: pairs/s and real (non-padding) tokens/s of
the training steps (first step excluded as warm-up), pairs per CPU-second of the process (less sensitive
to other load on a shared machine), seconds per step, the loss at equal steps (mean of the
last 5) and the largest per-step relative loss difference (same weights + same data + same optimizer =>
the same loss curve up to float rounding: this checks that both sides compute the same thing).
Without TRL installed the chatsmith side runs alone, with a note. The last line is one JSON object.

Measured while writing it (world preferences, 3.5 M Llama, batch 16, 10-12 steps, a 2-core machine shared
with ~6 other jobs): `--threads 1`: chatsmith 16.3 vs TRL 5.4 pairs/s, rm_ratio 3.0 (CPU-time ratio 3.1),
identical losses at every step. With 2 threads on that oversubscribed machine both sides are dominated
by OpenMP waiting (ratio 0.76, CPU-time ratio 1.03); rerun on a quiet machine for the 2-thread figure.
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

from children import have_trl, run_child

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- shared setup (parent)

def synthetic_preferences(n: int, seed: int = 0) -> list[dict]:
    """World-like pairwise preferences (used when chatsmith.world is not available).

    A mix of single-turn questions and multi-turn chats (longer shared prompts), helpful answers against
    rude, wrong or evasive ones of varied lengths.
    """
    rng = random.Random(seed)
    countries = [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
                 ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("Peru", "Lima", "Spanish"),
                 ("Kenya", "Nairobi", "Swahili"), ("Norway", "Oslo", "Norwegian"), ("Egypt", "Cairo", "Arabic")]
    names = ["Ana", "Bo", "Chen", "Dara", "Eli", "Farah"]
    rows = []
    for _ in range(n):
        c, cap, lang = rng.choice(countries)
        other = rng.choice(countries)
        kind = rng.random()
        if kind < 0.4:
            prompt = [{"role": "user", "content": f"What is the capital of {c}?"}]
            chosen = f"The capital of {c} is {cap}."
            rejected = rng.choice([f"The capital of {c} is {other[1]}.", "Look it up yourself.",
                                   f"{c} is a country. Countries have many cities, and some of them are big, "
                                   f"and people live in them, and I am not sure which one you mean."])
        elif kind < 0.75:
            name = rng.choice(names)
            prompt = [{"role": "system", "content": "You are a helpful assistant. Answer briefly and politely."},
                      {"role": "user", "content": f"Hi, my name is {name}. Which language do people speak in {c}?"},
                      {"role": "assistant", "content": f"People in {c} mostly speak {lang}."},
                      {"role": "user", "content": f"And what is the capital of {other[0]}?"},
                      {"role": "assistant", "content": f"The capital of {other[0]} is {other[1]}."},
                      {"role": "user", "content": "Do you remember my name?"}]
            chosen = f"Yes, your name is {name}."
            rejected = rng.choice(["No.", f"Your name is {rng.choice(names)}, obviously.",
                                   "I don't remember anything, stop asking me things."])
        else:
            prompt = [{"role": "user", "content": f"Write a haiku about {cap}."}]
            chosen = f"Streets of {cap} hum\nold stones under evening light\n{lang} voices drift"
            rejected = rng.choice(["No.", f"{cap} is a city in {c}.", "Haiku are boring. Write it yourself."])
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def load_preferences(n: int, seed: int) -> tuple[list[dict], list[str], str]:
    """Pairwise rows ({prompt messages, chosen, rejected}), texts for the tokenizer, and where they came from."""
    try:
        from chatsmith.world import World

        world = World(seed=seed)
        rows = []
        for row in world.preferences():
            prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            if "ranked" in row:     # TRL's RewardTrainer takes pairs only: best vs worst
                rows.append({"prompt": prompt, "chosen": row["ranked"][0], "rejected": row["ranked"][-1]})
            else:
                rows.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
        rows = [r for r in rows if isinstance(r["chosen"], str) and isinstance(r["rejected"], str)]
        if not rows:
            raise ValueError("no pairwise rows")
        return rows, world.corpus(), "chatsmith.world"
    except Exception:   # the world generator is optional here
        rows = synthetic_preferences(n, seed)
        texts = [m["content"] for r in rows for m in r["prompt"]] + [r["chosen"] for r in rows] + \
            [r["rejected"] for r in rows]
        return rows, texts, "synthetic fallback"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _load_pairs(work: Path) -> list[dict]:
    return json.loads((work / "pairs.json").read_text())


# ----------------------------------------------------------------------------- chatsmith side (child)

def run_chatsmith(work: Path, args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatsmith.train.batching import ShardedBatchSource
    from chatsmith.train.supervised import Trainer
    from chatsmith.train.preference_functional import prefix_tree
    from chatsmith.train.reward import RewardConfig, TreeCollate, make_reward_loss

    tokenizer = AutoTokenizer.from_pretrained(str(work / "rm"))
    model = AutoModelForSequenceClassification.from_pretrained(str(work / "rm"), dtype=torch.float32)
    pairs = _load_pairs(work)
    trees = [prefix_tree([p["chosen_ids"], p["rejected_ids"]], share=not args.no_share) for p in pairs]
    cfg = RewardConfig(out=str(work / "chatsmith_out"), max_steps=args.steps, lr=args.lr, warmup_steps=0,
                       min_lr_ratio=1.0, batch_size=args.batch_size, max_len=args.max_len, weight_decay=0.0,
                       grad_clip=1.0, device="cpu", dtype="fp32", progress=False, save_every=0)
    source = ShardedBatchSource(trees, cfg.batch_size, TreeCollate(tokenizer.pad_token_id), seed=0, shuffle=False)
    trainer = Trainer(cfg, model, tokenizer, source, make_reward_loss(0.0), stage="bench", save_final=False,
                      count_fn=lambda b: b.n_targets, token_count_fn=lambda b: b.n_tokens)
    model.train()
    losses, times, cpu_times, pairs_done = [], [], [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        row = trainer.train_step()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        losses.append(row["loss"])
        pairs_done.append(row["n_targets"])
    # tokens as both sides count them: chosen + rejected conversation lengths (the shared prompt twice)
    bs = args.batch_size
    tokens = [sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[i * bs:(i + 1) * bs])
              for i in range(args.steps)]
    return {"losses": losses, "times": times, "cpu_times": cpu_times, "tokens": tokens, "pairs": pairs_done,
            "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- TRL side (child)

def run_trl(work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "rm"))
    model = AutoModelForSequenceClassification.from_pretrained(str(work / "rm"), dtype=torch.float32)
    pairs = _load_pairs(work)
    dataset = Dataset.from_list([{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in pairs])
    config = RewardConfig(
        output_dir=str(work / "trl_out"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_length=args.max_len, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False,
        train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=0, use_cpu=True, disable_tqdm=True, dataset_num_proc=None,
        center_rewards_coefficient=None)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

            self.cpu_times: list[float] = []
            self._c = 0.0

        def on_step_begin(self, args_, state, control, **kw):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)
            self.cpu_times.append(time.process_time() - self._c)

    timer = StepTimer()
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[timer])
    if len(trainer.train_dataset) != len(pairs):
        raise RuntimeError(f"TRL filtered {len(pairs) - len(trainer.train_dataset)} pairs (longer than max_length)")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    bs = args.batch_size
    tokens = [sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[i * bs:(i + 1) * bs])
              for i in range(args.steps)]
    return {"losses": losses, "times": timer.times, "cpu_times": timer.cpu_times, "tokens": tokens,
            "pairs": [bs] * args.steps, "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- parent

def summarize(side: dict) -> dict:
    times, tokens, pairs = side["times"][1:], side["tokens"][1:], side["pairs"][1:]   # drop the warm-up step
    elapsed = max(1e-9, sum(times))
    cpu = max(1e-9, sum(side["cpu_times"][1:]))
    last = side["losses"][-5:]
    return {"pairs_per_s": sum(pairs) / elapsed, "tokens_per_s": sum(tokens) / elapsed,
            "pairs_per_cpu_s": sum(pairs) / cpu,
            "step_s": elapsed / max(1, len(times)), "final_loss": sum(last) / max(1, len(last)),
            "peak_rss_mb": side["peak_rss_mb"]}


def run_rm_bench(steps: int = 30, batch_size: int = 16, max_len: int = 256, lr: float = 1e-4,
                 vocab_size: int = 4096, seed: int = 0, share_prompt: bool = True, only: str | None = None,
                 threads: int = 0, verbose: bool = True) -> dict:
    """Run both sides (each in a child process) and return the figures.

    Keys: `chatsmith_rm_pairs_per_s`, `trl_rm_pairs_per_s` (None without TRL), `rm_ratio` (None without
    TRL), `chatsmith_rm_tokens_per_s`, `trl_rm_tokens_per_s`, `rm_loss_rel_diff`, `rm_max_step_loss_rel_diff`,
    and the settings. `verbose` prints the table (not the JSON line).
    """
    import torch

    sys.path.insert(0, str(HERE))
    from sft_vs_trl import build_tokenizer, make_model   # the same tiny Llama and tokenizer as the SFT benchmark

    from chatsmith.chat.templates import get_format
    from chatsmith.reward_model import render_for_scoring
    from chatsmith.train.reward import reward_model_from_causal_lm

    need = steps * batch_size
    rows, texts, origin = load_preferences(max(need * 2, 1000), seed)
    tokenizer = build_tokenizer(texts, vocab_size)
    fmt = get_format("chatml")
    pairs = []
    for row in rows:
        chosen = render_for_scoring(row["prompt"] + [{"role": "assistant", "content": row["chosen"]}], tokenizer, fmt)[0]
        rejected = render_for_scoring(row["prompt"] + [{"role": "assistant", "content": row["rejected"]}],
                                      tokenizer, fmt)[0]
        if len(chosen) <= max_len and len(rejected) <= max_len:
            pairs.append({"chosen_ids": chosen, "rejected_ids": rejected})
    random.Random(seed).shuffle(pairs)
    if not pairs:
        raise RuntimeError("no preference pair fits max_len")
    if len(pairs) < need:
        pairs = pairs * (need // len(pairs) + 1)
    pairs = pairs[:need]
    lengths = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    causal = make_model(tokenizer, seed)
    rm = reward_model_from_causal_lm(causal, tokenizer, seed=seed)
    n_params = sum(p.numel() for p in rm.parameters())

    sides: dict[str, tuple[dict, dict]] = {}
    trl_ok = have_trl()
    with tempfile.TemporaryDirectory(prefix="rm_vs_trl.") as tmp:
        work = Path(tmp)
        rm.save_pretrained(str(work / "rm"))
        tokenizer.save_pretrained(str(work / "rm"))
        (work / "pairs.json").write_text(json.dumps(pairs))
        argv = ["--steps", str(steps), "--batch-size", str(batch_size), "--max-len", str(max_len), "--lr", str(lr),
                "--seed", str(seed), "--threads", str(threads)] + ([] if share_prompt else ["--no-share"])
        for side in ("chatsmith", "trl"):
            if only and side != only:
                continue
            if side == "trl" and not trl_ok:
                print("note: trl/datasets not installed (pip install -e '.[bench]'); running chatsmith alone",
                      file=sys.stderr)
                continue
            raw = run_child(__file__, side, work, argv)
            if raw is not None:
                sides[side] = (raw, summarize(raw))

    out: dict = {"steps": steps, "batch_size": batch_size, "max_len": max_len, "params_m": round(n_params / 1e6, 3),
                 "data": origin, "mean_pair_tokens": round(sum(lengths) / len(lengths), 1),
                 "threads": threads or torch.get_num_threads(), "share_prompt": share_prompt}
    for name, (_, s) in sides.items():
        out[f"{name}_rm_pairs_per_s"] = round(s["pairs_per_s"], 2)
        out[f"{name}_rm_tokens_per_s"] = round(s["tokens_per_s"], 1)
        out[f"{name}_rm_pairs_per_cpu_s"] = round(s["pairs_per_cpu_s"], 2)
        out[f"{name}_rm_final_loss"] = round(s["final_loss"], 5)
        out[f"{name}_rm_peak_rss_mb"] = round(s["peak_rss_mb"], 1)
    out.setdefault("chatsmith_rm_pairs_per_s", None)
    out.setdefault("trl_rm_pairs_per_s", None)
    if "chatsmith" in sides and "trl" in sides:
        (cr, cs), (tr, ts) = sides["chatsmith"], sides["trl"]
        out["rm_ratio"] = round(cs["pairs_per_s"] / ts["pairs_per_s"], 3)
        out["rm_cpu_ratio"] = round(cs["pairs_per_cpu_s"] / ts["pairs_per_cpu_s"], 3)
        out["rm_loss_rel_diff"] = round(abs(cs["final_loss"] - ts["final_loss"]) / max(1e-12, ts["final_loss"]), 5)
        n = min(len(cr["losses"]), len(tr["losses"]))
        out["rm_max_step_loss_rel_diff"] = round(max(abs(a - b) / max(1e-12, b) for a, b in
                                                     zip(cr["losses"][:n], tr["losses"][:n])), 5)
    else:
        out["rm_ratio"] = None
    if verbose:
        print(f"data: {len(pairs)} pairs ({origin}), mean {out['mean_pair_tokens']:.0f} tokens per pair (chosen + "
              f"rejected), max {max(lengths)}; model: Llama {n_params / 1e6:.2f} M parameters + scalar head, vocab "
              f"{len(tokenizer)}; batch {batch_size} pairs, max length {max_len}, {steps} steps, "
              f"{threads or torch.get_num_threads()} threads")
        print(f"{'':12}{'pairs/s':>9}{'tokens/s':>10}{'pairs/CPU-s':>13}{'step s':>9}{'loss@end':>10}"
              f"{'peak RSS MB':>13}")
        for name, (_, s) in sides.items():
            print(f"{name:12}{s['pairs_per_s']:>9.1f}{s['tokens_per_s']:>10,.0f}{s['pairs_per_cpu_s']:>13.1f}"
                  f"{s['step_s']:>9.3f}{s['final_loss']:>10.4f}{s['peak_rss_mb']:>13,.0f}")
        if out["rm_ratio"] is not None:
            print(f"rm_ratio chatsmith/TRL pairs/s: {out['rm_ratio']:.2f}x; loss at step {steps}: relative "
                  f"difference {out['rm_loss_rel_diff']:.2%} (largest per-step {out['rm_max_step_loss_rel_diff']:.2%})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-share", action="store_true", help="chatsmith side: do not share the prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both children (0 = torch's default)")
    parser.add_argument("--only", choices=["chatsmith", "trl"], default=None)
    parser.add_argument("--child", choices=["chatsmith", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        result = (run_chatsmith if args.child == "chatsmith" else run_trl)(Path(args.work), args)
        print(json.dumps(result))
        return
    out = run_rm_bench(steps=args.steps, batch_size=args.batch_size, max_len=args.max_len, lr=args.lr,
                       vocab_size=args.vocab_size, seed=args.seed, share_prompt=not args.no_share, only=args.only,
                       threads=args.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
