"""The world's shipped base model: pretrained once with the full recipe, stored in the package.

The quick demo starts from it, so the SFT/RLHF stages a newcomer watches start from a model that has "read
the library" (held-out facts need about 1 M pretraining tokens, more than quick's budget on 2 CPU cores).
`chatsmith demo --profile full`, and `--pretrain` on quick, pretrain from scratch instead.

    base = shipped_base_for(Path("runs/demo/data/corpus.jsonl"))   # None when the corpus changed
    install_shipped_base(base, Path("runs/demo/base"))            # an fp32 model directory

To pretrain and ship it anew (maintainers; about 15 minutes on 2 CPU cores):

    chatsmith demo --profile full --until pretrain --no-cache --out runs/base-full
    python -m chatsmith.world.shipped runs/base-full    # writes src/chatsmith/world/base/

The directory `chatsmith/world/base/` holds the weights in fp16 (half the bytes of fp32; the tiny model
loses nothing measurable, see docs/EXPERIMENTS.md), the tokenizer, and `manifest.json`: the sha256 of the
corpus file it was pretrained on, the recipe (the pretrain settings), the commit and the final eval loss.
A corpus whose bytes differ from the manifest's is not the one the base model read: it is not used, and
the demo pretrains from scratch (tests/test_shipped_base.py fails first, so it never goes stale silently).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).parent / "base"
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: Path = SHIPPED_DIR) -> dict[str, Any] | None:
    """The shipped base model's manifest, or None when the package holds none."""
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def shipped_base_for(corpus: Path, directory: Path = SHIPPED_DIR) -> Path | None:
    """The shipped base model directory if it was pretrained on exactly this corpus file, else None."""
    manifest = read_manifest(directory)
    if manifest is None or not (directory / "config.json").is_file() or not corpus.is_file():
        return None
    return directory if manifest.get("corpus_sha256") == file_sha256(corpus) else None


def install_shipped_base(source: Path, out: Path) -> None:
    """Write the shipped base model to ``out`` as an fp32 model directory (training runs in fp32 on CPU)."""
    import torch

    from chatsmith.model import load_model, save_model

    loaded = load_model(source, device="cpu", dtype=torch.float32)
    manifest = read_manifest(source) or {}
    save_model(loaded.model.float(), loaded.tokenizer, out,
               extra_files={"shipped_base.json": json.dumps(manifest, indent=2) + "\n"})


def ship_base(model_dir: Path, corpus: Path, recipe: dict[str, Any], commit: str,
              directory: Path = SHIPPED_DIR) -> dict[str, Any]:
    """Store a pretrained base model (``model_dir``, trained on ``corpus`` with ``recipe``) in the package,
    weights in fp16, with its manifest. Returns the manifest."""
    import torch

    from chatsmith.model import load_model, save_model

    loaded = load_model(model_dir, device="cpu", dtype=torch.float32)
    metrics = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()] if (model_dir / "metrics.jsonl").is_file() else []
    eval_losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    manifest = {
        "corpus_sha256": file_sha256(corpus),
        "recipe": recipe,
        "commit": commit,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "weights_dtype": "float16",
    }
    save_model(loaded.model.to(torch.float16), loaded.tokenizer, directory,
               extra_files={MANIFEST: json.dumps(manifest, indent=2) + "\n"})
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`python -m chatsmith.world.shipped RUN_DIR`: ship RUN_DIR/base (a demo run's pretrain stage)."""
    import argparse
    import subprocess

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a `chatsmith demo --until pretrain` output directory")
    parser.add_argument("--commit", default="", help="the commit the run was made with (default: HEAD)")
    args = parser.parse_args(argv)
    base = args.run_dir / "base"
    config = yaml.safe_load((base / "train_config.yaml").read_text(encoding="utf-8"))
    recipe = {k: v for k, v in config.items() if k not in ("out", "data", "resume", "overwrite", "progress", "device")}
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    manifest = ship_base(base, args.run_dir / "data" / "corpus.jsonl", recipe, commit)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
