"""Benchmark: pretraining from transformers' standard init against chatsmith's `prev-token` and `induction` inits.

    python benchmarks/pretrain_init.py                  # 400 steps each, about 10 minutes on 2 cores
    python benchmarks/pretrain_init.py --steps 170      # quick's budget
    python benchmarks/pretrain_init.py --inits standard induction

Both runs pretrain the `tiny` preset on the built-in world's corpus (exported at the `quick`/`full` scale,
seed 0) with the same tokenizer, seed, data order and settings as `chatsmith demo` (batch 8 x 256 tokens,
lr 3e-3, 30 warmup steps, cosine decay); only `--init` differs. The held-out loss is measured every
`--eval-every` steps on the same rows. Reported:
- the held-out loss of both at every evaluation;
- `steps_to_match`: for each planted init, the first evaluation at which it is at or below standard init's
  final loss, and `step_ratio` = steps / steps_to_match (how many times fewer steps it needs for that loss);
- the attention weight head 0 of layer 0 gives the previous token, before and after training
  (on held-out text);
- copying: in roll calls of made-up names ("Class list: Tafe, Brika and Vopo. Teacher: Tafe? Tafe:
  Here! ..."), the mean loss in nats of a name token at its first mention and at later mentions;
- seconds per step (the planted heads cost nothing: the model is the same).
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


def name_copy_losses(model_dir: str, count: int = 40, seed: int = 5) -> tuple[float, float]:
    """Mean loss (nats) of a made-up name's tokens at its first mention and at its later mentions, in roll
    calls of three names: a later mention can only be predicted by copying from the context."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.world.text import invented_name

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    first, later = [], []
    for _ in range(count):
        names: list[str] = []
        while len(names) < 3:
            name = invented_name(rng)
            if name not in names:
                names.append(name)
        text = f"Class list: {names[0]}, {names[1]} and {names[2]}.\n" + "\n".join(
            f"Teacher: {n}?\n{n}: Here!" for n in rng.sample(names, 3))
        enc = tok(text, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        for name in names:
            starts = [i for i in range(len(text)) if text.startswith(name, i)]
            for k, start in enumerate(starts):
                tokens = [t for t, (b, e) in enumerate(enc.offset_mapping)
                          if t > 0 and e > b and b >= start and e <= start + len(name)]
                if tokens:
                    (first if k == 0 else later).append(float(nll[[t - 1 for t in tokens]].mean()))
    return sum(first) / len(first), sum(later) / len(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--inits", nargs="+", default=["standard", "prev-token", "induction"])
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from chatsmith.world.export import WorldExportConfig, export_world
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
    for init in args.inits:
        out = work / init
        cfg = PretrainConfig(data=corpus, out=str(out), init=init, preset="tiny", max_steps=args.steps,
                             batch_size=8, max_len=256, lr=3e-3, warmup_steps=30, save_every=0, log_every=10,
                             eval_every=args.eval_every, eval_batches=8, progress=False,
                             freeze_planted=init == "induction")   # the induction circuit's wiring stays fixed
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
                         "prev_attention_trained": previous_token_attention(str(out), held_out[:32]),
                         "name_copy": name_copy_losses(str(out))}

    curves = {init: r["curve"] for init, r in results.items()}
    steps = sorted(next(iter(curves.values())))
    print(f"\nheld-out loss, tiny preset on the world corpus, {args.steps} steps of 8 x 256 tokens")
    print(f"{'step':>6}  " + "  ".join(f"{init:>10}" for init in curves))
    for s in steps:
        print(f"{s:>6}  " + "  ".join(f"{curves[init].get(s, float('nan')):>10.3f}" for init in curves))
    target = curves["standard"][steps[-1]] if "standard" in curves else None
    for init, r in results.items():
        first, later = r["name_copy"]
        print(f"{init:>10}: previous-token attention of head 0.0 {r['prev_attention_init']:.2f} at init, "
              f"{r['prev_attention_trained']:.2f} trained; made-up names {first:.2f} nats at first mention, "
              f"{later:.2f} later; {r['seconds_per_step']:.3f} s/step")
    summary: dict = {"steps": args.steps, "eval_loss": {init: round(c[steps[-1]], 4) for init, c in curves.items()}}
    if target is not None:
        for init, curve in curves.items():
            if init != "standard":
                match = next((s for s in steps if curve.get(s, 1e9) <= target), None)
                summary.setdefault("steps_to_match", {})[init] = match
                summary.setdefault("step_ratio", {})[init] = round(args.steps / match, 2) if match else None
    summary.update({
        "prev_attention": {k: [round(v["prev_attention_init"], 3), round(v["prev_attention_trained"], 3)]
                           for k, v in results.items()},
        "name_copy_nats": {k: [round(x, 3) for x in v["name_copy"]] for k, v in results.items()},
        "seconds_per_step": {k: round(v["seconds_per_step"], 3) for k, v in results.items()},
        "threads": torch.get_num_threads(), "cpus": os.cpu_count()})
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
