"""Benchmark: pretraining from transformers' standard init against chatsmith's `prev-token` init.

    python benchmarks/pretrain_init.py                  # 400 steps each, about 7 minutes on 2 cores
    python benchmarks/pretrain_init.py --steps 200      # quicker

Both runs pretrain the `tiny` preset on the built-in world's corpus (exported at the `quick`/`full` scale,
seed 0) with the same tokenizer, seed, data order and settings as `chatsmith demo` (batch 8 x 256 tokens,
lr 3e-3, 30 warmup steps, cosine decay); only `--init` differs. The held-out loss is measured every
`--eval-every` steps on the same rows. Reported:
- the held-out loss of both at every evaluation;
- `steps_to_match`: the first evaluation at which prev-token init is at or below standard init's final
  loss, and `step_ratio` = steps / steps_to_match (how many times fewer steps it needs for that loss);
- the attention weight head 0 of layer 0 gives the previous token, before and after training
  (on held-out text), for both;
- seconds per step of both (the planted head costs nothing: the model is the same).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def previous_token_attention(model_dir: str, texts: list[str]) -> float:
    """Mean attention weight of layer 0, head 0 on the previous token over the first 128 tokens of `texts`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    weights = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids[:, :128]
        if ids.shape[1] < 8:
            continue
        with torch.no_grad():
            attn = model(ids, output_attentions=True).attentions[0][0, 0]        # (T, T)
        pos = torch.arange(1, ids.shape[1])
        weights.append(attn[pos, pos - 1].mean().item())
    return sum(weights) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from chatsmith.data.world import WorldExportConfig, export_world
    from chatsmith.model import create_model, save_model
    from chatsmith.train.pretrain import PretrainConfig, pretrain, read_corpus, split_documents
    from chatsmith.utils import set_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="chatsmith-init-bench-"))
    export_world(WorldExportConfig(out=str(work / "data"), seed=0, scale=1.0, eval_size=4))
    corpus = str(work / "data" / "corpus.jsonl")
    _, held_out = split_documents(read_corpus(corpus), 0.02, 0)

    results = {}
    for init in ("standard", "prev-token"):
        out = work / init
        cfg = PretrainConfig(data=corpus, out=str(out), init=init, preset="tiny", max_steps=args.steps,
                             batch_size=8, max_len=256, lr=3e-3, warmup_steps=30, save_every=0, log_every=10,
                             eval_every=args.eval_every, eval_batches=8, progress=False)
        pretrain(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        seconds = max(r.get("time", 0.0) for r in rows)           # training time, evaluations included
        curve = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
        # the head at step 0: a fresh model with the run's seed and tokenizer, as pretrain makes it
        set_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        save_model(create_model("tiny", tokenizer, init=init), tokenizer, str(work / f"{init}-init"))
        results[init] = {"curve": curve, "seconds_per_step": seconds / args.steps,
                         "prev_attention_init": previous_token_attention(str(work / f"{init}-init"), held_out[:32]),
                         "prev_attention_trained": previous_token_attention(str(out), held_out[:32])}

    std, prev = results["standard"]["curve"], results["prev-token"]["curve"]
    steps = sorted(std)
    print(f"\nheld-out loss, tiny preset on the world corpus, {args.steps} steps of 8 x 256 tokens")
    print(f"{'step':>6}  {'standard':>9}  {'prev-token':>10}")
    for s in steps:
        print(f"{s:>6}  {std[s]:>9.3f}  {prev.get(s, float('nan')):>10.3f}")
    target = std[steps[-1]]
    match = next((s for s in steps if prev.get(s, 1e9) <= target), None)
    for init in results:
        r = results[init]
        print(f"{init:>10}: previous-token attention of head 0.0 {r['prev_attention_init']:.2f} at init, "
              f"{r['prev_attention_trained']:.2f} trained; {r['seconds_per_step']:.3f} s/step")
    summary = {"steps": args.steps, "eval_loss_standard": round(target, 4),
               "eval_loss_prev_token": round(prev[steps[-1]], 4), "steps_to_match": match,
               "step_ratio": round(args.steps / match, 2) if match else None,
               "prev_attention": {k: [round(v["prev_attention_init"], 3), round(v["prev_attention_trained"], 3)]
                                  for k, v in results.items()},
               "seconds_per_step": {k: round(v["seconds_per_step"], 3) for k, v in results.items()},
               "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
