"""Benchmark: the shared Trainer under torchrun with `--parallel ddp` and `--parallel fsdp`, side by side.

    python benchmarks/fsdp_vs_ddp.py                       # 2 CPU processes (gloo), a 27 M-parameter Llama
    python benchmarks/fsdp_vs_ddp.py --nproc 4 --device cuda --hidden 1024 --layers 16

Both modes train the same Llama (identical initial weights from one saved directory) on the same random
token rows in the same order, with the next-token loss, AdamW and a constant learning rate, for `--steps`
optimizer steps. Each mode runs in its own `torchrun` launch. Reported per mode, from rank 0:
- training-state bytes held by one rank: parameters + gradients + AdamW moments (local shards under FSDP);
  DDP holds all of it on every rank, FSDP about 1/W of it, so the ratio should be near 1/nproc;
- peak RSS of one rank (CPU) or peak allocated CUDA memory, which adds activations and the runtime;
- seconds per step after the first (FSDP adds an all-gather per layer in forward and backward);
- the loss at every step, which must agree between the modes (the same math, sharded differently).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r'''
import json, os, resource, sys, time
import torch
from chatsmith.train.batching import ShardedBatchSource
from chatsmith.train.config import TrainConfig
from chatsmith.train.supervised import Trainer, lm_loss_on_targets
from chatsmith.utils import is_main_process
from transformers import AutoModelForCausalLM

work, mode, steps, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = torch.load(os.path.join(work, "rows.pt"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"))

def collate(items):
    ids = torch.stack(items)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return {"input_ids": ids, "targets": targets}

def loss_fn(m, b):
    loss, n = lm_loss_on_targets(m, b["input_ids"], b["targets"])
    return loss, n, {}

cfg = TrainConfig(out=os.path.join(work, mode), max_steps=steps, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0,
                  batch_size=batch, save_every=0, log_every=1, device=device, dtype="fp32", progress=False,
                  parallel=mode)
trainer = Trainer(cfg, model, None, ShardedBatchSource(list(rows), batch, collate, seed=0), loss_fn,
                  save_final=False)
losses, times = [], []
state_bytes = 0
for step in range(steps):
    start = time.perf_counter()
    if step == steps - 1:   # measure the state with the gradients still in place
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
    out = trainer.train_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    losses.append(out["loss"])

def local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()

params = [p for p in trainer.model.parameters()]
state_bytes = (sum(local_bytes(p) for p in params)
               + sum(local_bytes(p.grad) for p in params if p.grad is not None)
               + sum(local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.dim() > 0))
peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
if is_main_process():
    with open(os.path.join(work, mode + ".json"), "w") as f:
        json.dump({"losses": losses, "times": times, "state_bytes": state_bytes, "peak_bytes": peak}, f)
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2, help="rows per rank per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="fsdp_vs_ddp_"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq_len,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(work / "model"))
    n_rows = args.steps * args.batch_size * args.nproc
    torch.save(torch.randint(0, args.vocab, (n_rows, args.seq_len)), work / "rows.pt")
    (work / "worker.py").write_text(WORKER)

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.device == "cpu" and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = {}
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               str(work / "worker.py"), str(work), mode, str(args.steps), str(args.batch_size), args.device]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads((work / f"{mode}.json").read_text())

    ddp, fsdp = results["ddp"], results["fsdp"]
    step_time = {m: sum(r["times"][1:]) / max(1, len(r["times"]) - 1) for m, r in results.items()}
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(ddp["losses"], fsdp["losses"]))
    mib = 2 ** 20
    print(f"{n_params / 1e6:.1f} M parameters, {args.nproc} processes on {args.device}, {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} tokens per rank")
    print(f"{'':28s}{'ddp':>12s}{'fsdp':>12s}{'fsdp/ddp':>10s}")
    rows = [("training state / rank (MiB)", ddp["state_bytes"] / mib, fsdp["state_bytes"] / mib),
            ("peak memory / rank (MiB)", ddp["peak_bytes"] / mib, fsdp["peak_bytes"] / mib),
            ("seconds / step", step_time["ddp"], step_time["fsdp"])]
    for name, a, b in rows:
        print(f"{name:28s}{a:12.2f}{b:12.2f}{b / a:10.3f}")
    print(f"loss per step, ddp:  {[round(x, 5) for x in ddp['losses']]}")
    print(f"loss per step, fsdp: {[round(x, 5) for x in fsdp['losses']]} (largest relative difference {loss_diff:.1e})")
    print(json.dumps({"nproc": args.nproc, "device": args.device, "params_m": round(n_params / 1e6, 2),
                      "state_ratio": round(fsdp["state_bytes"] / ddp["state_bytes"], 4),
                      "peak_ratio": round(fsdp["peak_bytes"] / ddp["peak_bytes"], 4),
                      "step_time_ratio": round(step_time["fsdp"] / step_time["ddp"], 3),
                      "max_loss_rel_diff": loss_diff}))


if __name__ == "__main__":
    main()
