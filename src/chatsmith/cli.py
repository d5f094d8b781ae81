"""The `chatsmith` command line.

Every command is a config dataclass (its fields are the flags, see `chatsmith.config`) plus a
function that takes it. Modules are imported only when their command runs, so `--help` is instant.

    chatsmith demo                          # the whole journey on the built-in world
    chatsmith world export data/            # the built-in world as JSONL files
    chatsmith pretrain --data data/corpus.jsonl --preset tiny --out runs/base
    chatsmith sft --model runs/base --data data/sft.jsonl --template chatml --out runs/sft
    chatsmith chat runs/sft

Known failures (bad input or settings, an --out in use, a damaged checkpoint, a full disk, no CUDA) print one
line and exit with status 2; `chatsmith --debug COMMAND ...` shows the traceback too. Ctrl-C or SIGTERM stops
a training command after its current step with a checkpoint (exit status 130 or 143).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError, Interrupted


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
    Command("merge", "chatsmith.train.lora:MergeConfig:merge",
            "Merge a LoRA adapter directory into its base: a plain model directory.", positional=("adapter",)),
    Command("generate", "chatsmith.generate.cli:GenerateConfig:generate_cli",
            "Raw completion of a prompt (what a base model does).", positional=("model",)),
    Command("chat", "chatsmith.generate.terminal:ChatConfig:chat_cli",
            "Interactive multi-turn chat in the terminal, with memory.", positional=("model",)),
    Command("eval", "chatsmith.eval.behaviour:EvalConfig:evaluate_cli",
            "An eval suite (yours or the world's) on models, scored by a judge; writes report.json/.md/.html.",
            positional=("models",)),
    Command("eval compare", "chatsmith.eval.compare:CompareConfig:compare_cli",
            "Eval reports side by side (e.g. one per seed): each metric's values, mean and worst; a safety plot.",
            positional=("reports",)),
    Command("serve", "chatsmith.serve.cli:ServeConfig:serve",
            "OpenAI-compatible HTTP server with continuous batching, metrics and a web chat.", positional=("models",)),
    Command("quantize", "chatsmith.quantize:QuantizeConfig:quantize_cli",
            "Int8 copy of a model (torchao int8 weights) for faster CPU inference: generate, chat, eval, serve load it.",
            positional=("model",)),
    Command("feedback export", "chatsmith.serve.export:FeedbackExportConfig:export_feedback",
            "Human judgments from `serve --feedback DB` as a preference JSONL (for reward / dpo)."),
]


# Commands whose --out is one run's directory (chatsmith.train.outdir); each one's stage name is its name.
TRAINING_COMMANDS = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "rlhf")


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
    lines += ["", "global option: --debug   show the traceback of every error (also CHATSMITH_DEBUG=1)"]
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


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _interrupt_message(exc: KeyboardInterrupt, cmd: Command, cfg: Any) -> str:
    """What an interruption kept: the training loop's own message, else what OUT/checkpoint holds."""
    if getattr(exc, "message", None):
        return exc.message
    if cmd.name not in TRAINING_COMMANDS or cfg is None:
        return "interrupted"
    out = cfg.out
    checkpoint = Path(out) / "checkpoint"
    if (checkpoint / "state.pt").is_file():
        return f"interrupted; {checkpoint} is intact (run the same command with --resume to continue)"
    return "interrupted before any checkpoint was written; run the command again to start over"


def _check_out_early(cmd: Command, cfg: Any) -> None:
    """A training command's --out is checked again before loading models and data (the run's own claim on
    it comes later, in `chatsmith.train.run.Run`), so a wrong --out fails at once. Its stage name is the
    command's name."""
    if cmd.name in TRAINING_COMMANDS:
        from chatsmith.train.outdir import check_out_dir

        check_out_dir(cfg, cmd.name)


def _dry_run(cmd: Command, cfg: Any) -> int:
    """`--dry-run`: check the settings, print the memory estimate (`chatsmith.train.memory`), train nothing
    and leave --out alone."""
    from chatsmith.config import validate_config
    from chatsmith.train.memory import dry_run

    validate_config(cfg)
    return dry_run(cmd.name, cfg)


# Log lines that libraries print on import and that say nothing about the user's command: torchao (which
# transformers probes) cannot load its CUDA-only kernels on a CPU build, and torch deprecates the way torchao
# registers its enums. Only these exact messages are dropped; every other warning and error still shows.
IMPORT_NOISE = {"torchao": ("Failed to load ", "_C_"),
                "torch.utils._pytree": ("is an Enum subclass and is now natively supported", "")}


class _DropImportNoise(logging.Filter):
    def __init__(self, needles: tuple[str, str]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not all(n in text for n in self.needles)


def quiet_import_noise() -> None:
    """Drop `IMPORT_NOISE` (installed once per process, before anything imports torchao)."""
    for name, needles in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) for f in logger.filters):
            logger.addFilter(_DropImportNoise(needles))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_import_noise()
    debug = "--debug" in argv or os.environ.get("CHATSMITH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
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
    main_thread = threading.current_thread() is threading.main_thread()   # signal handlers work only there
    cfg, sigterm = None, signal.getsignal(signal.SIGTERM)
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
        if cmd.name in TRAINING_COMMANDS and getattr(cfg, "dry_run", False):
            return _dry_run(cmd, cfg)
        _check_out_early(cmd, cfg)
        if hasattr(cfg, "resume") and main_thread and sigterm == signal.SIG_DFL:
            # Training commands: SIGTERM (schedulers, `docker stop`) is Ctrl-C; the training loop itself
            # finishes the step and checkpoints (chatsmith.train.run.StopSignals).
            signal.signal(signal.SIGTERM, _raise_interrupted)
        result = func(cfg)
        return result if isinstance(result, int) else 0
    except ChatsmithError as exc:
        if debug:
            traceback.print_exc()
        print(f"chatsmith {cmd.name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `chatsmith ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a full disk is no bug: one line (torch and safetensors wrap the OSError)
        from chatsmith.utils import is_disk_full

        if debug or not is_disk_full(exc):
            raise
        print(f"chatsmith {cmd.name}: error: disk full ({exc}); free some space and run the same command "
              f"again (with --resume to continue from the last checkpoint)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        print(f"\nchatsmith {cmd.name}: {_interrupt_message(exc, cmd, cfg)}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    finally:
        from chatsmith.utils import shutdown_distributed

        if main_thread and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
