"""Benchmark: tokens/s of chatsmith's sampling engine vs transformers' `model.generate`.

Same model (the `tiny` preset: a ~4.2 M-parameter Llama, random init, 4096-token vocabulary), same
prompts, greedy decoding, a fixed number of new tokens (no end-of-sequence stop on either side), batch 1
and batch 16 (prompts of different lengths, so both sides left-pad). The two are timed alternately,
call after call, so machine noise hits both alike; the ratio is the median of the per-round wall-clock
ratios. The CPU-time ratio (best round of each, CPU seconds of this process) is printed too: on a shared
machine it is the steadier figure.
chatsmith runs with its defaults (it also computes the log-probabilities of the sampled tokens).

    python benchmarks/generate_vs_hf.py                 # about a minute on 2 CPU cores
    python benchmarks/generate_vs_hf.py --rounds 9 --new-tokens 128 --threads 1

Prints a table, then as its last line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from chatsmith.generate import SamplingConfig, generate  # noqa: E402
from chatsmith.model import PRESETS, build_tokenizer, count_parameters, create_model  # noqa: E402

CORPUS = [
    "The capital of Veldoria is Marisport. Marisport lies on the river Alune and is famous for its bridges.",
    "What is the capital of Ostrava? The capital of Ostrava is Kelm, a city of glass towers and old markets.",
    "Write a short poem about the sea. The sea is grey, the sea is wide, it keeps its secrets on the tide.",
    "To make tea, boil water, pour it over the leaves and wait three minutes before you drink it.",
] * 20


def build(device: str) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CORPUS, 1000, "chatml")
    model = create_model("tiny", tokenizer)
    model.resize_token_embeddings(PRESETS["tiny"]["vocab_size"])   # the preset's full vocabulary size
    model.generation_config.eos_token_id = None                    # never stop early: fixed token count
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def make_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [32] if batch == 1 else [int(x) for x in torch.randint(16, 49, (batch,), generator=g)]
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def run_hf(model, tokenizer, prompts, new_tokens, device) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[:, longest:].tolist()


def run_chatsmith(model, tokenizer, prompts, new_tokens) -> list[list[int]]:
    return generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=new_tokens, temperature=0)).sequences


def measure(model, tokenizer, batch, new_tokens, rounds, device) -> dict:
    prompts = make_prompts(batch, PRESETS["tiny"]["vocab_size"], seed=batch)
    same = run_chatsmith(model, tokenizer, prompts, new_tokens) == run_hf(model, tokenizer, prompts, new_tokens, device)
    times = {"chatsmith": [], "hf": []}
    cpu = {"chatsmith": [], "hf": []}
    for r in range(rounds):
        order = ("chatsmith", "hf") if r % 2 == 0 else ("hf", "chatsmith")   # alternate who goes first
        for name in order:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            if name == "chatsmith":
                seqs = run_chatsmith(model, tokenizer, prompts, new_tokens)
            else:
                seqs = run_hf(model, tokenizer, prompts, new_tokens, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            assert sum(len(s) for s in seqs) == batch * new_tokens
    n_tokens = batch * new_tokens
    ratios = [h / c for c, h in zip(times["chatsmith"], times["hf"])]
    return {
        "chatsmith": n_tokens / statistics.median(times["chatsmith"]),
        "hf": n_tokens / statistics.median(times["hf"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        # CPU seconds of this process (best round): less sensitive to other processes on a shared machine
        "cpu_ratio": min(cpu["hf"]) / min(cpu["chatsmith"]),
        "same_tokens": same,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per side and batch size")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = build(args.device)
    # warm-up: first calls pay for allocator growth and lazy initialisation on both sides
    warm = make_prompts(2, 1000, seed=0)
    run_chatsmith(model, tokenizer, warm, 8)
    run_hf(model, tokenizer, warm, 8, args.device)

    results = {b: measure(model, tokenizer, b, args.new_tokens, args.rounds, args.device) for b in (1, 16)}
    print(f"generate_vs_hf: tiny Llama ({count_parameters(model) / 1e6:.2f} M parameters), greedy, "
          f"{args.new_tokens} new tokens, {args.rounds} alternating rounds, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    print(f"{'batch':>5}  {'chatsmith tok/s':>15}  {'hf generate tok/s':>17}  {'ratio (min-max)':>19}  "
          f"{'cpu-time ratio':>14}  same tokens")
    for b, r in results.items():
        print(f"{b:>5}  {r['chatsmith']:>15.1f}  {r['hf']:>17.1f}  "
              f"{r['ratio']:>6.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})  {r['cpu_ratio']:>14.2f}  "
              f"{r['same_tokens']}")
    summary = {"new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "device": args.device}
    for b, r in results.items():
        summary[f"chatsmith_tokens_per_s_b{b}"] = round(r["chatsmith"], 1)
        summary[f"hf_tokens_per_s_b{b}"] = round(r["hf"], 1)
        summary[f"ratio_b{b}"] = round(r["ratio"], 3)
        summary[f"cpu_time_ratio_b{b}"] = round(r["cpu_ratio"], 3)
        summary[f"same_tokens_b{b}"] = r["same_tokens"]
    print(json.dumps(summary))
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
