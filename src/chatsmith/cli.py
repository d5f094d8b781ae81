"""The `chatsmith` command line.

Every command is a config dataclass (its fields are the flags, see `chatsmith.config`) plus a
function that takes it. Modules are imported only when their command runs, so `--help` is instant.

    chatsmith demo                          # the whole journey on the built-in world
    chatsmith world export data/            # the built-in world as JSONL files
    chatsmith pretrain --data data/corpus.jsonl --preset tiny --out runs/base
    chatsmith sft --model runs/base --data data/sft.jsonl --template chatml --out runs/sft
    chatsmith chat runs/sft
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from chatsmith.errors import ChatsmithError


@dataclass(frozen=True)
class Command:
    name: str            # as typed, e.g. "world export"
    target: str          # "module:ConfigClass:function"
    summary: str
    positional: tuple[str, ...] = ()   # config fields that may also be given positionally


COMMANDS: list[Command] = [
    Command("demo", "chatsmith.world.demo:DemoConfig:run_demo",
            "Run the whole journey (world -> base -> SFT -> reward model -> PPO/DPO -> report)."),
    Command("world export", "chatsmith.world.export:WorldExportConfig:export_world",
            "Write the built-in synthetic world (corpus, SFT, preferences, prompts, eval) as files.",
            positional=("out",)),
    Command("data check", "chatsmith.data.check:DataCheckConfig:check_data",
            "Validate a data file: format, row counts, bad rows, token lengths.", positional=("path",)),
    Command("pretrain", "chatsmith.train.pretrain:PretrainConfig:pretrain",
            "Train a tokenizer and a base model from scratch on a text corpus (next-token loss)."),
    Command("sft", "chatsmith.train.sft:SFTConfig:sft",
            "Supervised fine-tuning on conversations, loss on assistant tokens only."),
    Command("reward", "chatsmith.train.reward:RewardConfig:train_reward_model",
            "Train a Bradley-Terry reward model on pairwise or ranked preferences."),
    Command("score", "chatsmith.train.reward:ScoreConfig:score",
            "Score conversations with a reward model.", positional=("reward_model",)),
    Command("ppo", "chatsmith.train.ppo:PPOConfig:ppo",
            "RLHF with PPO: policy, frozen reference (KL), frozen reward model, value model, GAE."),
    Command("dpo", "chatsmith.train.dpo:DPOConfig:dpo",
            "Direct preference optimisation against a frozen reference."),
    Command("grpo", "chatsmith.train.grpo:GRPOConfig:grpo",
            "GRPO with a reward model, your reward function or the world's judge."),
    Command("rlhf", "chatsmith.train.rlhf:RLHFConfig:rlhf",
            "Iterate: sample, rank (a judge or your labels), retrain the reward model, PPO again."),
    Command("generate", "chatsmith.generate.cli:GenerateConfig:generate_cli",
            "Raw completion of a prompt (what a base model does).", positional=("model",)),
    Command("chat", "chatsmith.generate.terminal:ChatConfig:chat_cli",
            "Interactive multi-turn chat in the terminal, with memory.", positional=("model",)),
    Command("eval", "chatsmith.eval.behaviour:EvalConfig:evaluate_cli",
            "An eval suite (yours or the world's) on models, scored by a judge; writes report.json/.md/.html.",
            positional=("models",)),
    Command("serve", "chatsmith.serve.cli:ServeConfig:serve",
            "OpenAI-compatible HTTP server with continuous batching, metrics and a web chat.", positional=("models",)),
]


def _find(argv: list[str]) -> tuple[Command | None, list[str]]:
    for n_words in (2, 1):
        name = " ".join(argv[:n_words])
        for cmd in COMMANDS:
            if cmd.name == name:
                return cmd, argv[n_words:]
    return None, argv


def _top_help() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [__doc__.strip().splitlines()[0], "", "usage: chatsmith COMMAND [options]   (chatsmith COMMAND --help)", "",
             "commands:"]
    lines += [f"  {c.name.ljust(width)}  {c.summary}" for c in COMMANDS]
    lines += ["", "\n".join(__doc__.strip().splitlines()[4:])]
    return "\n".join(lines)


def build_parser(cmd: Command):
    from chatsmith.config import add_config_arguments

    module_name, cls_name, _ = cmd.target.split(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    doc = (module.__doc__ or cmd.summary).strip()
    parser = argparse.ArgumentParser(prog=f"chatsmith {cmd.name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for pos in cmd.positional:
        parser.add_argument(f"_pos_{pos}", nargs="*" if pos.endswith("s") else "?", metavar=pos.upper(),
                            default=None, help=f"same as --{pos.replace('_', '-')}")
    add_config_arguments(parser, cls)
    return parser, module, cls


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] in ("--version", "version"):
        from chatsmith import __version__

        print(f"chatsmith {__version__}")
        return 0
    cmd, rest = _find(argv)
    if cmd is None:
        print(f"chatsmith: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_top_help(), file=sys.stderr)
        return 2
    try:
        from chatsmith.config import config_from_namespace

        parser, module, cls = build_parser(cmd)
        ns = parser.parse_args(rest)
        for pos in cmd.positional:
            value = getattr(ns, f"_pos_{pos}")
            delattr(ns, f"_pos_{pos}")
            if value not in (None, []):
                if hasattr(ns, pos):
                    parser.error(f"{pos} given twice (positionally and as --{pos.replace('_', '-')})")
                setattr(ns, pos, value)
        cfg = config_from_namespace(cls, ns)
        func = getattr(module, cmd.target.split(":")[2])
        result = func(cfg)
        return result if isinstance(result, int) else 0
    except ChatsmithError as exc:
        print(f"chatsmith {cmd.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchatsmith {cmd.name}: interrupted; the last checkpoint is intact "
              "(run the same command with --resume to continue).", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `chatsmith ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        from chatsmith.utils import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
