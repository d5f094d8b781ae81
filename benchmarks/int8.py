"""Benchmark: `chatsmith quantize --int8` against the fp32 model it was made from.

1. Speed and size: a ~110 M-parameter Llama built here (random init; hidden 768, 12 layers, 12 heads, FFN
   2048, 32,000-token vocabulary, tied LM head), saved in fp32, quantized with `chatsmith quantize`, both
   reloaded with `chatsmith.model.load_model`. Tokens/s of chatsmith's sampling engine at batch 1 (a 32-token
   prompt) and batch 16 (16-48 tokens, left-padded), greedy, a fixed number of new tokens; the two models
   are timed alternately, round after round, and each ratio is the median of the per-round ratios (the
   CPU-time ratio, best round of each, is printed too: steadier on a shared machine). Size is the bytes of
   the weight files on disk.
2. Quality: the demo's PPO model (`--ppo-dir`, default runs/demo/ppo) is quantized and both are evaluated
   with `chatsmith eval` on the demo's held-out suite (its data/eval, else the built-in world's) with the
   world's judge and, when the demo's reward model (rm/) is there, its mean reward; the largest absolute
   difference of any metric is `max_metric_delta`. Without a PPO model this part is skipped with a note.

    python benchmarks/int8.py [--rounds 5] [--new-tokens 32] [--threads N] [--ppo-dir runs/demo/ppo]

Prints a table, then as its last line one JSON object (speedup_batch1, speedup_batch16, size_ratio,
max_metric_delta, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from chatsmith.cli import quiet_import_noise  # noqa: E402
from chatsmith.generate import SamplingConfig, generate  # noqa: E402
from chatsmith.model import build_tokenizer, count_parameters, create_model, load_model, save_model  # noqa: E402
from chatsmith.quantize import QuantizeConfig, directory_weight_bytes, quantize_cli  # noqa: E402

VOCAB = 32000
CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
              intermediate_size=2048, max_position_embeddings=1024, tie_word_embeddings=True)
CORPUS = ["The capital of Veldoria is Marisport, on the river Alune.",
          "Write a short poem about the sea; the sea is grey and wide.",
          "To make tea, boil water and pour it over the leaves."] * 20


def build_pair(work: Path) -> tuple[Path, Path, int]:
    """Save the fp32 model and its int8 copy under ``work``; returns (fp32 dir, int8 dir, parameters)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CORPUS, 1000, "chatml")
    model = create_model(CONFIG, tokenizer)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)    # a real model's vocabulary size
    n_params = count_parameters(model)
    fp32, int8 = work / "fp32", work / "int8"
    save_model(model, tokenizer, fp32)
    quantize_cli(QuantizeConfig(model=str(fp32), int8=True, out=str(int8)))
    return fp32, int8, n_params


def make_prompts(batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [32] if batch == 1 else [int(x) for x in torch.randint(16, 49, (batch,), generator=g)]
    return [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in lengths]


def run(loaded, prompts, new_tokens) -> list[list[int]]:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    return generate(loaded.model, loaded.tokenizer, prompts, cfg).sequences


def measure(models: dict, batch: int, new_tokens: int, rounds: int) -> dict:
    prompts = make_prompts(batch, seed=batch)
    outs = {name: run(m, prompts, new_tokens) for name, m in models.items()}
    agree = sum(a == b for x, y in zip(outs["fp32"], outs["int8"]) for a, b in zip(x, y)) / (batch * new_tokens)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name in (("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")):   # alternate who goes first
            start, start_cpu = time.perf_counter(), time.process_time()
            seqs = run(models[name], prompts, new_tokens)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            assert sum(len(s) for s in seqs) == batch * new_tokens
    n = batch * new_tokens
    ratios = [f / q for f, q in zip(times["fp32"], times["int8"])]
    return {"fp32": n / statistics.median(times["fp32"]), "int8": n / statistics.median(times["int8"]),
            "speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "agree": agree,
            # CPU seconds of this process, best round of each: steadier than wall time on a shared machine
            "cpu_speedup": min(cpu["fp32"]) / min(cpu["int8"])}


def eval_metrics(ppo_dir: Path, work: Path) -> dict:
    """``chatsmith eval`` of the PPO model and its int8 copy: {name: {metric: value}}."""
    from chatsmith.eval.behaviour import EvalConfig, evaluate_cli

    int8 = work / "ppo-int8"
    quantize_cli(QuantizeConfig(model=str(ppo_dir), int8=True, out=str(int8)))
    demo = ppo_dir.parent
    suite = demo / "data" / "eval"
    rm = demo / "rm"
    cfg = EvalConfig(models=[str(ppo_dir), str(int8)], names=["ppo", "ppo-int8"], base=[], out=str(work / "report"),
                     suite=str(suite) if suite.exists() else "world", kl_samples=0, device="cpu",
                     reward_model=str(rm) if (rm / "config.json").is_file() else "")
    evaluate_cli(cfg)
    report = json.loads((work / "report" / "report.json").read_text(encoding="utf-8"))
    return {name: {k: v for k, v in report["models"][name].items() if isinstance(v, (int, float)) and
                   k not in ("eval_seconds",)} for name in ("ppo", "ppo-int8")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per model and batch size")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--ppo-dir", default="runs/demo/ppo", help="the demo's PPO model (skipped if absent)")
    args = parser.parse_args(argv)
    quiet_import_noise()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary: dict = {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                     "torch": torch.__version__, "machine": platform.machine()}
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        work = Path(tmp)
        fp32_dir, int8_dir, n_params = build_pair(work)
        size = {"fp32": directory_weight_bytes(fp32_dir), "int8": directory_weight_bytes(int8_dir)}
        models = {"fp32": load_model(fp32_dir, device="cpu"), "int8": load_model(int8_dir, device="cpu")}
        run(models["fp32"], make_prompts(2, 0), 4)      # warm-up: allocator growth, lazy initialisation
        run(models["int8"], make_prompts(2, 0), 4)
        results = {b: measure(models, b, args.new_tokens, args.rounds) for b in (1, 16)}
        print(f"int8: Llama {n_params / 1e6:.1f} M parameters (random init), greedy, {args.new_tokens} new tokens, "
              f"{args.rounds} alternating rounds, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"size on disk: fp32 {size['fp32'] / 1e6:.1f} MB, int8 {size['int8'] / 1e6:.1f} MB, "
              f"ratio {size['int8'] / size['fp32']:.3f}")
        print(f"{'batch':>5}  {'fp32 tok/s':>10}  {'int8 tok/s':>10}  {'speedup (min-max)':>19}  {'cpu-time speedup':>16}"
              f"  same greedy tokens")
        for b, r in results.items():
            print(f"{b:>5}  {r['fp32']:>10.1f}  {r['int8']:>10.1f}  {r['speedup']:>6.2f} ({r['min']:.2f}-{r['max']:.2f})"
                  f"  {r['cpu_speedup']:>16.2f}  {r['agree']:.1%}")
            summary[f"fp32_tokens_per_s_b{b}"] = round(r["fp32"], 1)
            summary[f"int8_tokens_per_s_b{b}"] = round(r["int8"], 1)
            summary[f"speedup_batch{b}"] = round(r["speedup"], 3)
            summary[f"cpu_time_speedup_batch{b}"] = round(r["cpu_speedup"], 3)
            summary[f"same_greedy_tokens_b{b}"] = round(r["agree"], 3)
        summary.update(parameters=n_params, size_fp32_bytes=size["fp32"], size_int8_bytes=size["int8"],
                       size_ratio=round(size["int8"] / size["fp32"], 4))
        del models
        ppo_dir = Path(args.ppo_dir)
        if (ppo_dir / "config.json").is_file():
            metrics = eval_metrics(ppo_dir, work)
            before, after = metrics["ppo"], metrics["ppo-int8"]
            deltas = {k: round(abs(after[k] - before[k]), 4) for k in before if k in after}
            print(f"eval of {ppo_dir} (chatsmith eval, greedy): metric, fp32, int8, |delta|")
            for k, d in deltas.items():
                print(f"  {k:<22} {before[k]:>8.4f} {after[k]:>8.4f} {d:>8.4f}")
            summary.update(ppo_dir=str(ppo_dir), metrics_fp32=before, metrics_int8=after,
                           max_metric_delta=max(deltas.values()) if deltas else None)
        else:
            summary.update(ppo_dir=str(ppo_dir), max_metric_delta=None,
                           note=f"{ppo_dir}: no PPO model there (run `chatsmith demo` or pass --ppo-dir); "
                                f"eval comparison skipped")
            print(summary["note"])
    print(json.dumps(summary))
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
