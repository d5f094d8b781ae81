"""Benchmark: `chatsmith serve` against `transformers serve --continuous-batching`, 1, 8 and 32 concurrent
streaming clients, on the same model, prompts and max_tokens, side by side in one run.

    python benchmarks/serve_vs_transformers.py                     # 1, 8, 32 clients, 32 new tokens
    python benchmarks/serve_vs_transformers.py --clients 1 8 --max-tokens 16 --requests-per-client 2
    python benchmarks/serve_vs_transformers.py --skip-transformers # chatsmith alone

The model is the randomly initialised `tiny` Llama of `generate_vs_hf.py` (hidden 256, 4 layers, a
4096-row embedding) with a ChatML tokenizer, saved once and loaded by both servers. Each server runs in
its own child process, one after the other (never both at once, so neither steals the other's cores),
on the CPU unless `--device cuda`. Each client sends `--requests-per-client` chat requests one after
another (streaming, greedy, `max_tokens` fixed, prompts of mixed lengths), all clients at once. Measured
per server and client count: output tokens per second over the wall time of the whole load (tokens from
the `usage` of the stream, else the reply re-tokenized), p50/p99 request latency, p99 time to first
token (first non-empty text). One warm-up request per server is not timed.

Target: at 32 clients, >= 2x transformers serve's tokens/s with a p99 time to first token no worse.
The last line is one JSON object: `ratio` (tokens/s, chatsmith over transformers, at the largest client
count), `ttft_p99_s` and `tokens_per_s` for both, and the full table under `runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
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


async def load(url: str, model: str, clients: int, per_client: int, max_tokens: int, tokenizer) -> dict:
    import httpx

    texts = prompts(clients * per_client, seed=clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker(c: int) -> list[dict]:
            return [await one_request(client, url, model, texts[c * per_client + r], max_tokens, tokenizer)
                    for r in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "latency_p50_s": round(percentile(lat, 50), 3),
            "latency_p99_s": round(percentile(lat, 99), 3), "ttft_p99_s": round(percentile(ttft, 99), 3)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def bench_server(kind: str, model_dir: Path, args, tokenizer) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(kind, model_dir, port, args.device, max(args.clients))
    try:
        await wait_ready(url, proc)
        model = str(model_dir)
        await load(url, model, 1, 1, args.max_tokens, tokenizer)          # warm-up, not timed
        rows = []
        for clients in args.clients:
            row = await load(url, model, clients, args.requests_per_client, args.max_tokens, tokenizer)
            row["server"] = kind
            print(f"{kind:>12} {clients:>3} clients: {row['tokens_per_s']:8.1f} tok/s  p50 {row['latency_p50_s']:.3f}s"
                  f"  p99 {row['latency_p99_s']:.3f}s  ttft p99 {row['ttft_p99_s']:.3f}s", flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        runs = asyncio.run(bench_server("chatsmith", model_dir, args, tokenizer))
        note = None
        if not args.skip_transformers:
            try:
                runs += asyncio.run(bench_server("transformers", model_dir, args, tokenizer))
            except Exception as exc:  # noqa: BLE001 - report chatsmith's figures even if the other side fails
                note = f"transformers serve failed: {type(exc).__name__}: {exc}"[:500]
                print(note, flush=True)
    top = max(args.clients)
    at_top = {r["server"]: r for r in runs if r["clients"] == top}
    ours, theirs = at_top.get("chatsmith"), at_top.get("transformers")
    result = {
        "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3) if ours and theirs else None,
        "clients": top,
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in at_top.items()},
        "ttft_p99_s": {k: v["ttft_p99_s"] for k, v in at_top.items()},
        "runs": runs, "note": note, "device": args.device, "max_tokens": args.max_tokens,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
