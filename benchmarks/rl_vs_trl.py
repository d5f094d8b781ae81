"""Benchmark: chatsmith RL against TRL - GRPO vs `GRPOTrainer`, reward-model training vs `RewardTrainer`, and
PPO episodes/s (TRL has no PPO trainer left to compare with), side by side in one run.

    python benchmarks/rl_vs_trl.py                  # everything (TRL from the optional `bench` extra)
    python benchmarks/rl_vs_trl.py --steps 6 --rm-steps 10 --ppo-steps 3      # quicker
    python benchmarks/rl_vs_trl.py --skip-rm        # GRPO and PPO only

GRPO, identical settings on both sides: the tiny Llama of `sft_vs_trl.py` (~3.6 M parameters, hidden 256,
4 layers, vocab 4096; the same initial weights, saved once and loaded by both), the same byte-level BPE
tokenizer and ChatML template, the same prompts (the built-in world's RL prompts, rendered with the
generation prompt), G = 4 completions per prompt x 4 prompts = 16 completions per step, at most 32 new
tokens, temperature 1, no top-k/top-p, one update per batch (num_iterations 1), clip 0.2, beta 0.04 (k3
KL to a frozen reference, so both sides run the reference forward), per-response-mean loss ("grpo"),
rewards scaled by the group std, AdamW lr 1e-5, fp32, dropout off, and the same programmatic reward
function of the completion text. TRL gets its best CPU settings (no gradient checkpointing, no bf16, no
vLLM: `transformers` generate). Each side runs in its own child process; the first step is warm-up and
not timed. Reported per side: episodes/s (completions per second of wall time), seconds per step, mean
completion length (both sides sample, so lengths can differ; the table shows them). A third run,
chatsmith with `share_prompt=False`, shows what computing each group's prompt once is worth
(`grpo_share_prompt_speedup`).

Reward model: `benchmarks/rm_vs_trl.py::run_rm_bench` (pairs/s vs `RewardTrainer`, `rm_ratio`).

PPO: chatsmith `ppo` at its default settings (32 episodes per step, 48 new tokens, temperature 0.7,
4 PPO epochs of 2 minibatches of 16) with the same tiny Llama as policy/reference and a reward model and
value model built from it; episodes/s and the time split into rollout (sampling + policy/reference
log-probs), scoring (reward model) and update (values, GAE, PPO epochs). The untrained policy rarely ends
its turn, so the no-end-of-turn penalty (which skips the reward model) is switched off here: every response
is scored, the worst case for the scoring phase.

The last line is one JSON object with at least `grpo_ratio`, `rm_ratio` and `ppo_episodes_per_s`.
Without TRL installed the chatsmith sides run alone, with a note, and the ratios are null.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from children import have_trl, run_child

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


def text_reward(text: str) -> float:
    """The shared toy reward: share of letters and spaces in the completion (cheap, same on both sides)."""
    return sum(c.isalpha() or c == " " for c in text) / max(1, len(text))


# ----------------------------------------------------------------------------- parent: shared setup

def prepare(work: Path, args) -> dict:
    """Save the tiny policy (+ reward model) once and write the prompts both sides use."""
    sys.path.insert(0, str(HERE))
    from sft_vs_trl import build_tokenizer, make_model

    from chatsmith.world import World
    from chatsmith.train.reward import reward_model_from_causal_lm

    world = World(seed=args.seed)
    tokenizer = build_tokenizer(world.corpus(), args.vocab_size)
    model = make_model(tokenizer, args.seed)
    model.save_pretrained(str(work / "policy"))
    tokenizer.save_pretrained(str(work / "policy"))
    rm = reward_model_from_causal_lm(model, tokenizer, seed=args.seed)
    rm.config.chatsmith_reward_mean, rm.config.chatsmith_reward_std = 0.0, 1.0
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(str(work / "rm"))
    tokenizer.save_pretrained(str(work / "rm"))
    rows = [{"messages": r["messages"]} for r in world.prompts() if len(r["messages"]) == 1]
    need = args.steps * args.prompts_per_step * 2
    rows = (rows * (need // max(1, len(rows)) + 1))[:max(need, len(rows))]
    with open(work / "prompts.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3), "vocab": len(tokenizer),
            "prompts": len(rows)}


# ----------------------------------------------------------------------------- children

def child_chatsmith_grpo(work: Path, args, share_prompt: bool = True) -> dict:
    import torch

    from chatsmith.train.grpo import GRPOConfig, GRPOTrainer

    class TextScorer:
        def __call__(self, rollout, prompts=None):
            return torch.tensor([text_reward(t) for t in rollout.texts])

    cfg = GRPOConfig(model=str(work / "policy"), prompts=str(work / "prompts.jsonl"), out=str(work / "cs_grpo"),
                     max_steps=args.steps, prompts_per_step=args.prompts_per_step, num_generations=args.generations,
                     num_iterations=1, batch_size=args.prompts_per_step * args.generations, lr=1e-5,
                     max_new_tokens=args.new_tokens, temperature=1.0, beta=args.beta, clip_range=0.2,
                     loss_type="grpo", scale_rewards=True, device="cpu", sample_every=0, save_every=0,
                     progress=False, seed=args.seed, share_prompt=share_prompt)
    trainer = GRPOTrainer(cfg, scorer=TextScorer())
    times, lengths, episodes = [], [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        m = trainer.train_step()
        times.append(time.perf_counter() - t)
        lengths.append(m["response_length"])
        episodes.append(m["episodes"])
    return {"times": times, "lengths": lengths, "episodes": episodes}


def child_trl_grpo(work: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "policy"))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(work / "policy"), dtype=torch.float32)
    rows = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"]} for r in rows])

    def reward_fn(completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [text_reward(t) for t in texts]

    config = GRPOConfig(output_dir=str(work / "trl_grpo"), max_steps=args.steps,
                        per_device_train_batch_size=args.prompts_per_step * args.generations,
                        num_generations=args.generations, max_completion_length=args.new_tokens,
                        num_iterations=1, beta=args.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
                        temperature=1.0, top_k=0, top_p=1.0, learning_rate=1e-5, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True,
                        use_vllm=False, report_to="none", logging_steps=1, save_strategy="no",
                        dataloader_num_workers=0, seed=args.seed, shuffle_dataset=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._last = None

        def on_train_begin(self, a, state, control, **kw):
            self._last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self._last)     # data + generation + scoring + update of this step
            self._last = now

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    n = args.prompts_per_step * args.generations
    return {"times": timer.times, "lengths": lengths, "episodes": [n] * len(timer.times)}


def child_chatsmith_ppo(work: Path, args) -> dict:
    from chatsmith.train.ppo import PPOConfig, PPOTrainer

    cfg = PPOConfig(policy=str(work / "policy"), reward_model=str(work / "rm"), prompts=str(work / "prompts.jsonl"),
                    out=str(work / "cs_ppo"), max_steps=args.ppo_steps, device="cpu", sample_every=0, save_every=0,
                    progress=False, seed=args.seed, no_eos_penalty=None)
    trainer = PPOTrainer(cfg)
    rows = []
    for _ in range(args.ppo_steps):
        t = time.perf_counter()
        m = trainer.train_step()
        rows.append({"step_s": time.perf_counter() - t, "rollout_s": m["rollout_s"], "generate_s": m["generate_s"],
                     "score_s": m["score_s"], "update_s": m["update_s"], "episodes": m["episodes"],
                     "length": m["response_length"]})
    return {"rows": rows, "settings": {k: getattr(cfg, k) for k in ("rollout_batch_size", "batch_size", "grad_accum",
                                                                    "ppo_epochs", "max_new_tokens", "temperature")}}


CHILDREN = {"chatsmith_grpo": child_chatsmith_grpo, "trl_grpo": child_trl_grpo, "chatsmith_ppo": child_chatsmith_ppo,
            "chatsmith-unshared_grpo": lambda work, args: child_chatsmith_grpo(work, args, share_prompt=False)}


def grpo_summary(raw: dict) -> dict:
    times, eps = raw["times"][1:], raw["episodes"][1:]     # first step = warm-up
    elapsed = max(1e-9, sum(times))
    lengths = [x for x in raw["lengths"] if x is not None]
    return {"episodes_per_s": sum(eps) / elapsed, "step_s": elapsed / max(1, len(times)),
            "mean_length": sum(lengths) / max(1, len(lengths))}


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per side (the first is warm-up)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="G: completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--ppo-steps", type=int, default=4, help="PPO steps at default settings (first is warm-up)")
    parser.add_argument("--rm-steps", type=int, default=20, help="reward-model steps per side (rm_vs_trl.py)")
    parser.add_argument("--skip-rm", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.manual_seed(args.seed)
        print(json.dumps(CHILDREN[args.child](Path(args.work), args)))
        return

    import torch

    argv = ["--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step), "--generations",
            str(args.generations), "--new-tokens", str(args.new_tokens), "--beta", str(args.beta),
            "--ppo-steps", str(args.ppo_steps), "--seed", str(args.seed)]
    out: dict = {"grpo_steps": args.steps, "completions_per_step": args.prompts_per_step * args.generations,
                 "generations": args.generations, "new_tokens": args.new_tokens, "beta": args.beta,
                 "threads": torch.get_num_threads()}
    trl_ok = have_trl()
    if not trl_ok:
        print("note: trl/datasets not installed (pip install -e '.[bench]'); chatsmith runs alone and the "
              "ratios are null", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rl_vs_trl.") as tmp:
        work = Path(tmp)
        out.update(prepare(work, args))
        grpo: dict[str, dict] = {}
        for name in ("chatsmith_grpo", "trl_grpo", "chatsmith-unshared_grpo"):
            if name == "trl_grpo" and not trl_ok:
                continue
            raw = run_child(__file__, name, work, argv)
            if raw is not None:
                grpo[name.split("_")[0]] = grpo_summary(raw)
        ppo_raw = run_child(__file__, "chatsmith_ppo", work, argv)

    print(f"model: Llama {out['params_m']} M parameters, vocab {out['vocab']}; GRPO {out['completions_per_step']} "
          f"completions per step (G = {args.generations}), <= {args.new_tokens} new tokens, beta {args.beta}, "
          f"{args.steps} steps (first not timed), {out['threads']} threads")
    print(f"{'GRPO':12}{'episodes/s':>12}{'step s':>9}{'mean len':>10}")
    for name, s in grpo.items():
        print(f"{name:12}{s['episodes_per_s']:>12.1f}{s['step_s']:>9.3f}{s['mean_length']:>10.1f}")
        out[f"{name}_grpo_episodes_per_s"] = round(s["episodes_per_s"], 2)
        out[f"{name}_grpo_mean_length"] = round(s["mean_length"], 1)
    out["grpo_ratio"] = (round(grpo["chatsmith"]["episodes_per_s"] / grpo["trl"]["episodes_per_s"], 3)
                         if "chatsmith" in grpo and "trl" in grpo else None)
    if out["grpo_ratio"] is not None:
        print(f"grpo_ratio chatsmith/TRL episodes/s: {out['grpo_ratio']:.2f}x")
    if "chatsmith" in grpo and "chatsmith-unshared" in grpo:
        out["grpo_share_prompt_speedup"] = round(grpo["chatsmith"]["episodes_per_s"]
                                                 / grpo["chatsmith-unshared"]["episodes_per_s"], 3)
        print(f"group prompt computed once vs per response (--no-share-prompt): "
              f"{out['grpo_share_prompt_speedup']:.2f}x")

    out["ppo_episodes_per_s"] = None
    if ppo_raw is not None:
        rows = ppo_raw["rows"][1:] or ppo_raw["rows"]
        total = sum(r["step_s"] for r in rows)
        eps = sum(r["episodes"] for r in rows)
        split = {k: sum(r[k] for r in rows) for k in ("rollout_s", "generate_s", "score_s", "update_s")}
        out["ppo_episodes_per_s"] = round(eps / max(1e-9, total), 2)
        out["ppo_step_s"] = round(total / len(rows), 3)
        out.update({f"ppo_{k[:-2]}_share": round(v / max(1e-9, total), 3) for k, v in split.items()})
        out["ppo_settings"] = ppo_raw["settings"]
        out["ppo_mean_length"] = round(sum(r["length"] for r in rows) / len(rows), 1)
        print(f"PPO at defaults {ppo_raw['settings']}: {out['ppo_episodes_per_s']:.1f} episodes/s, "
              f"{out['ppo_step_s']:.2f} s/step; rollout {split['rollout_s'] / total:.0%} (of it sampling "
              f"{split['generate_s'] / total:.0%}), scoring {split['score_s'] / total:.0%}, update "
              f"{split['update_s'] / total:.0%}; mean response {out['ppo_mean_length']} tokens")

    out["rm_ratio"] = None
    if not args.skip_rm:
        sys.path.insert(0, str(HERE))
        try:
            from rm_vs_trl import run_rm_bench
        except ImportError as exc:
            print(f"note: benchmarks/rm_vs_trl.py not importable ({exc}); rm_ratio is null", file=sys.stderr)
        else:
            rm = run_rm_bench(steps=args.rm_steps, seed=args.seed, verbose=True)
            out["rm_ratio"] = rm.get("rm_ratio")
            for k in ("chatsmith_rm_pairs_per_s", "trl_rm_pairs_per_s", "rm_loss_rel_diff"):
                out[k] = rm.get(k)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
