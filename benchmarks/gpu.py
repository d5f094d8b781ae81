"""Benchmark on one GPU: SFT and GRPO of a Qwen2-shaped 0.5 B model, chatsmith against TRL, side by side.

The model is built here, randomly initialised, in bf16, from Qwen2-0.5B's published hyperparameters (hidden
896, 24 layers, 14 query / 2 key-value heads, FFN 4864, q/k/v biases, RoPE theta 1e6, RMSNorm eps 1e-6,
151,936-token vocabulary, tied LM head); the tokenizer is a byte-level BPE trained here on the data (ChatML
special tokens), its ids well inside the model's vocabulary. Nothing is downloaded.

- SFT: the same conversations (the built-in world's, else synthetic ones), batch 16, max length 512,
  assistant-only loss, AdamW, constant learning rate; chatsmith packs, TRL pads (its default). Reported per
  side: tokens/s (real tokens), MFU (6 x matmul parameters + attention per token, against a bf16 matmul peak
  measured in the same run), peak GPU memory.
- GRPO: 8 prompts x 4 completions per step, at most 128 new tokens, temperature 1, beta 0.04 (a frozen
  reference), the same text reward; TRL generates with `transformers` (no vLLM). Reported: episodes/s,
  an MFU estimate (training 6N + reference 2N per token of prompt and completion, 2N per sampled token),
  peak GPU memory.

Each side runs in its own process (peak memory is its own); the first step of each is warm-up, not timed.
With the default settings the whole run takes about 5 minutes on an H100 (the limit is 8).

    python benchmarks/gpu.py                  # needs CUDA; TRL from the `bench` extra
    python benchmarks/gpu.py --smoke          # CPU, a tiny config, seconds: checks the setup only

The last line is one JSON object: per side and stage tokens_per_s / episodes_per_s, mfu, peak_mem_gb, and
the ratios `sft_ratio` and `grpo_ratio` (chatsmith / TRL; null without TRL).
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
sys.path.insert(0, str(HERE))

# Qwen2-0.5B's config.json (Qwen/Qwen2-0.5B), the fields that shape the compute.
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True, hidden_act="silu")


def settings(smoke: bool) -> dict:
    if smoke:
        return dict(config=SMOKE, device="cpu", dtype="fp32", sft_steps=2, sft_batch=4, max_len=128, grpo_steps=2,
                    prompts_per_step=2, generations=2, new_tokens=8, vocab=400)
    return dict(config=QWEN2_05B, device="cuda", dtype="bf16", sft_steps=12, sft_batch=16, max_len=512,
                grpo_steps=5, prompts_per_step=8, generations=4, new_tokens=128, vocab=8000)


# ----------------------------------------------------------------------------- shared setup (parent)

def prepare(work: Path, s: dict, seed: int = 0) -> dict:
    """Save the model (random init) with its tokenizer, the SFT conversations and the GRPO prompts."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft_vs_trl import build_tokenizer, load_conversations

    convs, texts, source = load_conversations(2000, seed)
    tokenizer = build_tokenizer(texts, s["vocab"])
    torch.manual_seed(seed)
    config = Qwen2Config(**s["config"], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    model = Qwen2ForCausalLM(config)
    if s["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(work / "model"))
    tokenizer.save_pretrained(str(work / "model"))
    need_convs = s["sft_steps"] * s["sft_batch"]
    convs = (convs * (need_convs // max(1, len(convs)) + 1))[:need_convs]
    (work / "conversations.json").write_text(json.dumps(convs))
    prompts = [{"messages": [m for m in c if m["role"] != "assistant"][:1]} for c in convs]
    prompts = [p for p in prompts if p["messages"] and p["messages"][0]["role"] == "user"]
    need_prompts = s["grpo_steps"] * s["prompts_per_step"] * 2
    prompts = (prompts * (need_prompts // max(1, len(prompts)) + 1))[:need_prompts]
    with open(work / "prompts.jsonl", "w") as fh:
        for row in prompts:
            fh.write(json.dumps(row) + "\n")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "linear_params": linear,
            "tokenizer_vocab": len(tokenizer), "model_vocab": config.vocab_size, "conversations": len(convs),
            "prompts": len(prompts), "data": source}


def peak_flops(device: str, dtype: str) -> float:
    """Best matmul throughput (FLOP/s) measured here: the MFU ceiling."""
    import torch

    n = 8192 if device == "cuda" else 512
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- children

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def child_chatsmith_sft(work: Path, s: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.chat.templates import get_format
    from chatsmith.train.batching import ShardedBatchSource
    from chatsmith.train.sft import SFTCollator, SFTConfig, assistant_loss, prepare_examples
    from chatsmith.train.supervised import Trainer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"))
    convs = json.loads((work / "conversations.json").read_text())
    examples, _ = prepare_examples([(c, f"#{i}") for i, c in enumerate(convs)], tokenizer, get_format("chatml"),
                                   s["max_len"], "drop")
    cfg = SFTConfig(out=str(work / "cs_sft"), max_steps=s["sft_steps"], lr=1e-5, warmup_steps=0, min_lr_ratio=1.0,
                    batch_size=s["sft_batch"], max_len=s["max_len"], device=s["device"], dtype=s["dtype"],
                    progress=False, save_every=0)
    collate = SFTCollator(tokenizer.pad_token_id, s["max_len"], packing=True)
    source = ShardedBatchSource(examples, cfg.batch_size, collate, seed=0, shuffle=False)
    trainer = Trainer(cfg, model, tokenizer, source, assistant_loss, stage="bench", save_final=False,
                      token_count_fn=lambda b: b["n_tokens"])
    times, tokens = [], []
    for _ in range(s["sft_steps"]):
        _sync(s["device"])
        t = time.perf_counter()
        row = trainer.train_step()
        _sync(s["device"])
        times.append(time.perf_counter() - t)
        tokens.append(row["tokens"])
    return {"times": times, "tokens": tokens, "peak_gb": _peak_gb(s["device"])}


def child_trl_sft(work: Path, s: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft_vs_trl import CHATML_WITH_GENERATION

    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    tokenizer.chat_template = CHATML_WITH_GENERATION
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"))
    convs = json.loads((work / "conversations.json").read_text())
    bf16 = s["dtype"] == "bf16"
    config = SFTConfig(output_dir=str(work / "trl_sft"), max_steps=s["sft_steps"],
                       per_device_train_batch_size=s["sft_batch"], max_length=s["max_len"], learning_rate=1e-5,
                       lr_scheduler_type="constant", warmup_steps=0, assistant_only_loss=True, packing=False,
                       bf16=bf16, gradient_checkpointing=False, logging_steps=1, report_to="none",
                       save_strategy="no", dataloader_num_workers=0, seed=0, use_cpu=s["device"] == "cpu",
                       disable_tqdm=True)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            _sync(s["device"])
            self.t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            _sync(s["device"])
            times.append(time.perf_counter() - self.t)

    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"messages": c} for c in convs]),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    bs = s["sft_batch"]
    tokens = [sum(lengths[i * bs:(i + 1) * bs]) for i in range(len(times))]
    return {"times": times, "tokens": tokens, "peak_gb": _peak_gb(s["device"])}


def child_chatsmith_grpo(work: Path, s: dict) -> dict:
    import torch

    from chatsmith.train.grpo import GRPOConfig, GRPOTrainer
    from rl_vs_trl import text_reward

    class TextScorer:
        def __call__(self, rollout, prompts=None):
            return torch.tensor([text_reward(t) for t in rollout.texts])

    n = s["prompts_per_step"] * s["generations"]
    cfg = GRPOConfig(model=str(work / "model"), prompts=str(work / "prompts.jsonl"), out=str(work / "cs_grpo"),
                     max_steps=s["grpo_steps"], prompts_per_step=s["prompts_per_step"], num_generations=s["generations"],
                     num_iterations=1, batch_size=n, lr=1e-6, max_new_tokens=s["new_tokens"], temperature=1.0,
                     beta=0.04, clip_range=0.2, loss_type="grpo", device=s["device"], dtype=s["dtype"],
                     sample_every=0, save_every=0, progress=False, seed=0)
    trainer = GRPOTrainer(cfg, scorer=TextScorer())
    times, episodes, tokens, sampled = [], [], [], []
    for _ in range(s["grpo_steps"]):
        _sync(s["device"])
        t = time.perf_counter()
        m = trainer.train_step()
        _sync(s["device"])
        times.append(time.perf_counter() - t)
        episodes.append(m["episodes"])
        sampled.append(m["response_length"] * m["episodes"])
        tokens.append(m.get("prompt_length", 0) * m["episodes"] + sampled[-1])
    return {"times": times, "episodes": episodes, "tokens": tokens, "sampled": sampled,
            "peak_gb": _peak_gb(s["device"])}


def child_trl_grpo(work: Path, s: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl_vs_trl import text_reward

    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"))
    rows = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
    n = s["prompts_per_step"] * s["generations"]

    def reward_fn(completions, **kwargs):
        return [text_reward(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    config = GRPOConfig(output_dir=str(work / "trl_grpo"), max_steps=s["grpo_steps"], per_device_train_batch_size=n,
                        num_generations=s["generations"], max_completion_length=s["new_tokens"], num_iterations=1,
                        beta=0.04, epsilon=0.2, loss_type="grpo", temperature=1.0, top_k=0, top_p=1.0,
                        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
                        use_cpu=s["device"] == "cpu", bf16=s["dtype"] == "bf16", gradient_checkpointing=False,
                        use_vllm=False, report_to="none", logging_steps=1, save_strategy="no", seed=0)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _sync(s["device"])
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config,
                          train_dataset=Dataset.from_list([{"prompt": r["messages"]} for r in rows]),
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    sampled = [x * n for x in lengths][:len(times)]
    return {"times": times, "episodes": [n] * len(times), "tokens": sampled, "sampled": sampled,
            "peak_gb": _peak_gb(s["device"])}


CHILDREN = {"chatsmith_sft": child_chatsmith_sft, "trl_sft": child_trl_sft,
            "chatsmith_grpo": child_chatsmith_grpo, "trl_grpo": child_trl_grpo}


# ----------------------------------------------------------------------------- parent

def summarize(raw: dict | None, flops_per_token: float, peak: float, rl: bool) -> dict | None:
    """Figures of one side and stage, the first (warm-up) step dropped."""
    if raw is None:
        return None
    times = raw["times"][1:] or raw["times"]
    k = len(raw["times"]) - len(times)
    elapsed = max(1e-9, sum(times))
    out = {"step_s": round(elapsed / len(times), 4), "peak_mem_gb": raw["peak_gb"] and round(raw["peak_gb"], 2)}
    tokens = sum(raw["tokens"][k:])
    if rl:
        out["episodes_per_s"] = round(sum(raw["episodes"][k:]) / elapsed, 3)
        # training forward+backward (6N) and the reference forward (2N) on every token, sampling (2N) per
        # sampled token; a lower bound for TRL, whose logged tokens are completions only
        flops = tokens * 8 * flops_per_token / 6 + sum(raw["sampled"][k:]) * 2 * flops_per_token / 6
    else:
        out["tokens_per_s"] = round(tokens / elapsed, 1)
        flops = tokens * flops_per_token
    out["mfu"] = round(flops / elapsed / peak, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, seconds: checks the setup only")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from chatsmith.cli import quiet_import_noise

    quiet_import_noise()                 # torchao's import-time log lines (transformers probes it)
    s = settings(args.smoke)
    if args.child:
        print(json.dumps(CHILDREN[args.child](Path(args.work), s)))
        return
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; it measures one GPU (run it on a machine with one, or "
              "`--smoke` to check the setup on a CPU)", file=sys.stderr)
        sys.exit(2)
    started = time.perf_counter()
    trl = have_trl()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        info = prepare(work, s)
        peak = peak_flops(s["device"], s["dtype"])
        mean_len = s["max_len"] / 2
        cfg = s["config"]
        per_token = 6 * info["linear_params"] + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_len
        results = {}
        for stage in ("sft", "grpo"):
            for side in ("chatsmith", "trl"):
                if side == "trl" and not trl:
                    results[f"{side}_{stage}"] = None
                    continue
                raw = run_child(__file__, f"{side}_{stage}", work, ["--smoke"] if args.smoke else [])
                results[f"{side}_{stage}"] = summarize(raw, per_token, peak, rl=stage == "grpo")
    device = torch.cuda.get_device_name(0) if s["device"] == "cuda" else "cpu (smoke)"
    print(f"gpu: Qwen2-shaped {info['params_m']} M parameters, {s['dtype']}, {device}, "
          f"matmul peak {peak / 1e12:.1f} TFLOP/s, torch {torch.__version__}")
    print(f"{'side':<10} {'stage':<5} {'tokens/s':>10} {'episodes/s':>10} {'MFU':>7} {'peak GB':>8}")
    for key, r in results.items():
        side, stage = key.split("_")
        if r is None:
            print(f"{side:<10} {stage:<5} {'(not run: TRL is not installed)' if side == 'trl' and not trl else '(failed)'}")
            continue
        print(f"{side:<10} {stage:<5} {r.get('tokens_per_s', ''):>10} {r.get('episodes_per_s', ''):>10} "
              f"{r['mfu']:>7.2%} {r['peak_mem_gb'] if r['peak_mem_gb'] is not None else '-':>8}")

    def ratio(stage: str, field: str) -> float | None:
        a, b = results.get(f"chatsmith_{stage}"), results.get(f"trl_{stage}")
        return round(a[field] / b[field], 3) if a and b and b[field] else None

    summary = {"device": device, "smoke": args.smoke, **info, "peak_flops": round(peak), **results,
               "sft_ratio": ratio("sft", "tokens_per_s"), "grpo_ratio": ratio("grpo", "episodes_per_s"),
               "seconds": round(time.perf_counter() - started, 1)}
    if not trl:
        summary["note"] = "TRL is not installed (pip install -e .[bench]): only chatsmith's side ran"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
