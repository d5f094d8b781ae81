"""Benchmark: `chatsmith serve` against `transformers serve --continuous-batching`, 1, 8 and 32 concurrent
streaming clients, on the same model, prompts and max_tokens, side by side in one run.

    python benchmarks/serve_vs_transformers.py                     # 1, 8, 32 clients, 32 new tokens
    python benchmarks/serve_vs_transformers.py --clients 1 8 --max-tokens 16 --requests-per-client 2
    python benchmarks/serve_vs_transformers.py --skip-transformers # chatsmith alone

The model is the randomly initialised `tiny` Llama of `generate_vs_hf.py` (hidden 256, 4 layers, a
4096-row embedding) with a ChatML tokenizer, saved once and loaded by both servers. Each server runs in
its own child process (both started once; an idle one uses no CPU), on the CPU unless `--device cuda`.
A load: every client sends `--requests-per-client` chat requests one after another (streaming, greedy,
`max_tokens` fixed, prompts of mixed lengths), all clients at once. For each client count, `--rounds`
loads per server, alternating which server goes first, so a busy spell of the machine hits both.
Measured per server and client count: output tokens per second over the wall time of a load (median of
the rounds; tokens from the `usage` of the stream, else the reply re-tokenized), p50/p99 request latency
and p99 time to first token (first non-empty text) over all requests of all rounds; the ratio is the
median of the per-round ratios. One warm-up request per server is not timed.

Target: at 32 clients, >= 2x transformers serve's tokens/s with a p99 time to first token no worse.
The last line is one JSON object: `ratio` (tokens/s, chatsmith over transformers, at the largest client
count; null with `--skip-transformers`), `ttft_p99_s` and `tokens_per_s` for both, `ratios` for every
client count, and the full table under `runs`. `transformers serve` needs `accelerate` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from chatsmith.model import PRESETS, build_tokenizer, create_model, save_model  # noqa: E402

WORDS = ("the capital of veldoria is a city on the river where people trade salt and wool every "
         "morning the market opens before sunrise and merchants argue about prices while children "
         "run between the stalls what is the tallest mountain in the north write a short poem about "
         "the sea explain how a bridge carries weight").split()


def build_model(out: Path) -> Path:
    torch.manual_seed(0)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(400)]
    tokenizer = build_tokenizer(corpus, 1000, "chatml")
    model = create_model("tiny", tokenizer)
    model.resize_token_embeddings(PRESETS["tiny"]["vocab_size"])   # the preset's full vocabulary size
    return save_model(model, tokenizer, out)


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, model_dir: Path, port: int, device: str, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if kind == "chatsmith":
        cmd = [sys.executable, "-m", "chatsmith", "serve", str(model_dir), "--port", str(port), "--device", device,
               "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning"]
    else:
        exe = shutil.which("transformers") or "transformers"
        cmd = [exe, "serve", str(model_dir), "--continuous-batching", "--port", str(port), "--host", "127.0.0.1",
               "--device", device, "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if (await client.get(url + "/health", timeout=2)).status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not become ready")


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, tokenizer) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    text, usage = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    reply = "".join(text)
    tokens = usage["completion_tokens"] if usage else len(tokenizer.encode(reply, add_special_tokens=False))
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def load(url: str, model: str, clients: int, per_client: int, max_tokens: int, tokenizer,
               seed: int = 0) -> dict:
    """``clients`` concurrent clients, ``per_client`` requests each; the raw per-request results and wall time."""
    import httpx

    texts = prompts(clients * per_client, seed=seed)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker(c: int) -> list[dict]:
            return [await one_request(client, url, model, texts[c * per_client + r], max_tokens, tokenizer)
                    for r in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    return {"results": results, "wall_s": wall, "tokens": sum(r["tokens"] for r in results)}


def summarize(kind: str, clients: int, rounds: list[dict]) -> dict:
    """Median tokens/s over the rounds; latency and time-to-first-token percentiles over all requests."""
    results = [r for rnd in rounds for r in rnd["results"]]
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    return {"server": kind, "clients": clients, "requests": len(results),
            "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": round(statistics.median(r["tokens"] / r["wall_s"] for r in rounds), 1),
            "latency_p50_s": round(percentile(lat, 50), 3), "latency_p99_s": round(percentile(lat, 99), 3),
            "ttft_p99_s": round(percentile(ttft, 99), 3)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def bench(model_dir: Path, args, tokenizer) -> tuple[list[dict], dict[int, float]]:
    """Start the servers, then for each client count run ``--rounds`` rounds, alternating which server
    goes first (an idle server uses no CPU, so each load has the cores to itself). Returns the summary rows
    and, per client count, the median of the per-round tokens/s ratios (chatsmith over transformers)."""
    kinds = ["chatsmith"] + ([] if args.skip_transformers else ["transformers"])
    procs, urls = {}, {}
    try:
        for kind in kinds:
            port = free_port()
            urls[kind] = f"http://127.0.0.1:{port}"
            procs[kind] = start_server(kind, model_dir, port, args.device, max(args.clients))
        for kind in kinds:
            await wait_ready(urls[kind], procs[kind])
            await load(urls[kind], str(model_dir), 1, 1, args.max_tokens, tokenizer)     # warm-up, not timed
        rows, ratios = [], {}
        for clients in args.clients:
            rounds: dict[str, list[dict]] = {k: [] for k in kinds}
            for r in range(args.rounds):
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                    rounds[kind].append(await load(urls[kind], str(model_dir), clients, args.requests_per_client,
                                                   args.max_tokens, tokenizer, seed=clients * 100 + r))
            for kind in kinds:
                row = summarize(kind, clients, rounds[kind])
                print(f"{kind:>12} {clients:>3} clients: {row['tokens_per_s']:8.1f} tok/s  p50 {row['latency_p50_s']:.3f}s"
                      f"  p99 {row['latency_p99_s']:.3f}s  ttft p99 {row['ttft_p99_s']:.3f}s", flush=True)
                rows.append(row)
            if len(kinds) == 2:
                per_round = [a["tokens"] / a["wall_s"] / (b["tokens"] / b["wall_s"])
                             for a, b in zip(rounds["chatsmith"], rounds["transformers"])]
                ratios[clients] = round(statistics.median(per_round), 3)
                print(f"{'':>12} {clients:>3} clients: ratio {ratios[clients]:.2f} "
                      f"(rounds {', '.join(f'{x:.2f}' for x in per_round)})", flush=True)
        return rows, ratios
    finally:
        for proc in procs.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed loads per server and client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        rows, ratios = asyncio.run(bench(model_dir, args, tokenizer))
    top = max(args.clients)
    at_top = {r["server"]: r for r in rows if r["clients"] == top}
    result = {
        "ratio": ratios.get(top),
        "clients": top,
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in at_top.items()},
        "ttft_p99_s": {k: v["ttft_p99_s"] for k, v in at_top.items()},
        "ratios": {str(k): v for k, v in ratios.items()},
        "runs": rows, "device": args.device, "max_tokens": args.max_tokens, "rounds": args.rounds,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
