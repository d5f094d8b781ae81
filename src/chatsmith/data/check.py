"""`chatsmith data check FILE`: validate a data file and show what matters before training.

    chatsmith data check data/sft.jsonl
    chatsmith data check data/sft.jsonl --tokenizer runs/base --template chatml --max-len 256
    chatsmith data check prefs.parquet --format preference --on-bad-row skip
    chatsmith data check data/prompts.jsonl --for grpo --tokenizer runs/sft --max-new-tokens 64

Prints the detected format and what it is used as, rows read / usable / bad, every bad row as
`file:line` (or `file#row N`) with its reason, and, given `--tokenizer DIR`, the token-length
distribution (min/median/p90/p99/max) of the rendered examples and how many rows `--max-len` would
truncate (at a turn boundary) or drop. `--for STAGE` reads the file as that training command does (sft:
chat data, so a conversation without an assistant turn is a bad row) and, with a tokenizer, applies its
row rules with the same functions it calls (`chatsmith.data.rules`): what it keeps, drops and whether it
would refuse the file. Without `--for` the command that reads the detected kind of data is assumed.
Exit status: 0 = usable as is; 1 = bad rows (with the default `--on-bad-row error`, training would stop
on them; with `skip` they are listed but the status is 0), rows that the chat template cannot render, no
usable row, or a file the training command would refuse (no row left after its rules); 2 = the file
cannot be read at all or a setting is invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from chatsmith.config import arg
from chatsmith.data.formats import LoadResult, fit_to_length, load_examples
from chatsmith.data.records import FORMATS, KINDS, ChatExample, PreferenceExample, TextExample
from chatsmith.data.rules import STAGE_KINDS, prompt_budget, require_rows
from chatsmith.errors import ChatsmithError


@dataclass
class DataCheckConfig:
    path: str = arg("", "The data file (JSONL, JSON, Parquet) or saved `datasets` directory to check.")
    format: str | None = arg(None, f"Row format instead of auto-detection: {', '.join(FORMATS)}.")
    kind: str | None = arg(None, "Check as this kind of data (default: the format's own).", choices=KINDS)
    on_bad_row: str = arg("error", "What training would do with bad rows: error (exit 1 here) or skip.",
                          choices=["error", "skip"])
    template: str | None = arg(None, "Chat template for token lengths: chatml, llama2, alpaca, jinja (the "
                                     "tokenizer's own, default) or a .jinja file.")
    tokenizer: str | None = arg(None, "Model or tokenizer directory; enables the token-length report.")
    stage: str | None = arg(None, "Apply the row rules of this training command, exactly as it applies them (default: "
                                  "the command that reads the file's kind of data: text pretrain, chat sft, "
                                  "preference reward, prompt ppo).", choices=list(STAGE_KINDS), short="--for")
    max_len: int | None = arg(None, "Report how many rows this many tokens would truncate or drop (default with "
                                    "--tokenizer: the command's own --max-len default).", min=1)
    max_new_tokens: int | None = arg(None, "For ppo and grpo: the response length that --max-len must leave room "
                                           "for (default: the command's own).", min=1)
    overlength: str | None = arg(None, "For sft: truncate or drop over-long conversations (default: sft's own).",
                                 choices=["truncate", "drop"])
    show_bad: int = arg(20, "How many bad rows to list.", min=0)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list: a value that occurs in the data."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def length_line(lengths: Sequence[int]) -> str:
    values = sorted(lengths)
    return (f"min {values[0]}  median {percentile(values, 50)}  p90 {percentile(values, 90)}  "
            f"p99 {percentile(values, 99)}  max {values[-1]}  (n={len(values)})")


def _load_tokenizer(path: str) -> Any:
    """A model or tokenizer directory, or a Hub id (`chatsmith.model.model_source`; a tokenizer-only directory
    has no config.json, so this is not `checked_model_source`)."""
    from chatsmith.model import hub_where, model_source

    source, hub = model_source(path)
    if not hub and not Path(source).is_dir():
        raise ChatsmithError(f"--tokenizer {path}: not a directory (give a model or tokenizer directory, or a "
                             f"Hugging Face Hub id)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=not hub)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ChatsmithError(f"--tokenizer {hub_where(source) if hub else path}: cannot load a tokenizer: "
                             f"{exc}") from None


def _token_report(cfg: DataCheckConfig, result: LoadResult, tokenizer: Any) -> bool:
    """Print the token-length report; returns False if some rows cannot be rendered."""
    examples = result.examples
    if not examples:
        return True
    if result.kind == "text":
        lengths = [len(tokenizer(ex.text, add_special_tokens=False)["input_ids"]) for ex in examples
                   if isinstance(ex, TextExample)]
        print(f"token lengths (documents): {length_line(lengths)}")
        if cfg.max_len:
            over = sum(n > cfg.max_len for n in lengths)
            print(f"max length {cfg.max_len}: {over} of {len(lengths)} documents are longer (pretraining "
                  "packs text into rows of max length, so nothing is lost)")
        return True

    from chatsmith.chat.render import render_chat, render_prompt
    from chatsmith.chat.templates import get_format

    try:
        fmt = get_format(cfg.template, tokenizer)
    except ChatsmithError as exc:
        print(f"token lengths: cannot use the chat template: {exc}")
        return False

    lengths: list[int] = []
    outcomes = {"truncate": {"kept": 0, "truncated": 0, "dropped": 0}, "drop": {"kept": 0, "truncated": 0, "dropped": 0}}
    failures: list[str] = []
    unit = {"chat": "conversations", "prompt": "prompts", "preference": "prompt+response sequences"}[result.kind]
    for ex in examples:
        try:
            if isinstance(ex, PreferenceExample):
                sequences = [render_chat(ex.prompt + [{"role": "assistant", "content": r}], tokenizer, fmt)
                             for r in ex.responses]
                rendered = [(s.input_ids, s.assistant_mask) for s in sequences]
            elif result.kind == "prompt":
                ids = render_prompt(ex.messages, tokenizer, fmt, tools=ex.tools)
                rendered = [(ids, [0] * len(ids))]
            else:
                assert isinstance(ex, ChatExample)
                chat = render_chat(ex.messages, tokenizer, fmt, tools=ex.tools)
                rendered = [(chat.input_ids, chat.assistant_mask)]
        except ChatsmithError as exc:
            failures.append(f"{ex.origin}: cannot render with template {fmt.name}: {exc}")
            continue
        for ids, mask in rendered:
            lengths.append(len(ids))
            if cfg.max_len:
                for policy in outcomes:
                    outcomes[policy][fit_to_length(ids, mask, None, cfg.max_len, policy).status] += 1

    if lengths:
        print(f"token lengths ({unit}, template {fmt.name}): {length_line(lengths)}")
    if cfg.max_len and lengths:
        over = len(lengths) - outcomes["drop"]["kept"]
        line = f"max length {cfg.max_len}: {over} of {len(lengths)} {unit} are longer"
        if over and result.kind == "chat":
            t = outcomes["truncate"]
            line += (f"; truncate: {t['truncated']} truncated at a turn boundary, {t['dropped']} dropped (not even "
                     f"the first reply fits); drop: {over} dropped")
        elif over:
            line += f"; they would be dropped ({result.kind} data is never cut)"
        print(line)
    if failures:
        print(f"rows the template cannot render: {len(failures)}")
        for line in failures[:cfg.show_bad]:
            print(f"  {line}")
        if len(failures) > cfg.show_bad:
            print(f"  ... and {len(failures) - cfg.show_bad} more")
    return not failures


KIND_STAGES = {"text": "pretrain", "chat": "sft", "preference": "reward", "prompt": "ppo"}
STAGE_CONFIGS = {"pretrain": "chatsmith.train.pretrain:PretrainConfig", "sft": "chatsmith.train.sft:SFTConfig",
                 "reward": "chatsmith.train.reward:RewardConfig", "dpo": "chatsmith.train.dpo:DPOConfig",
                 "ppo": "chatsmith.train.ppo:PPOConfig", "grpo": "chatsmith.train.grpo:GRPOConfig"}


def stage_defaults(stage: str) -> Any:
    """The default config of training command ``stage`` (its --max-len, --max-new-tokens, --overlength)."""
    import importlib

    module, name = STAGE_CONFIGS[stage].split(":")
    return getattr(importlib.import_module(module), name)()


def stage_rules(cfg: DataCheckConfig, result: LoadResult, stage: str, tokenizer: Any, fmt: Any) -> bool:
    """Apply the row rules of training command ``stage`` with the very functions it calls; print what it
    would keep and drop. False when the command would refuse the file (no row left)."""
    defaults = stage_defaults(stage)
    max_len = cfg.max_len or defaults.max_len
    try:
        if stage == "sft":
            from chatsmith.train.sft import prepare_examples

            overlength = cfg.overlength or defaults.overlength
            rows = [(ex.messages, ex.origin, ex.tools) for ex in result.examples]
            kept, stats = prepare_examples(rows, tokenizer, fmt, max_len, overlength)
            print(f"sft rules (--max-len {max_len}, --overlength {overlength}): {stats.line()}")
            require_rows(kept, cfg.path, "no conversation left to train on", stats.line())
        elif stage in ("reward", "dpo"):
            from chatsmith.train.preference_data import dropped_line, tokenize_preferences

            tok = tokenize_preferences(result.examples, tokenizer, fmt, max_len)
            print(f"{stage} rules (--max-len {max_len}): {len(tok.trees)} examples kept ({tok.n_pairs} pairs)")
            if tok.n_dropped:
                print(dropped_line(stage, tok.n_dropped, max_len))
            require_rows(tok.trees, cfg.path, f"no preference example fits in --max-len {max_len} tokens",
                         f"{tok.n_dropped} dropped as longer")
        elif stage in ("ppo", "grpo"):
            from chatsmith.train.rollout import dropped_prompts_line, select_prompts

            max_new = cfg.max_new_tokens or defaults.max_new_tokens
            budget = prompt_budget(max_len, max_new)
            if budget < 1:
                raise ChatsmithError(f"--max-new-tokens {max_new} leaves no room for a prompt in --max-len {max_len}")
            items, dropped = select_prompts(result.examples, tokenizer, fmt, budget, cfg.path)
            print(f"{stage} rules (--max-len {max_len}, --max-new-tokens {max_new}): {len(items)} prompts kept")
            if dropped:
                print(dropped_prompts_line(stage, dropped, budget))
    except ChatsmithError as exc:
        print(f"{stage} would stop: {exc}")
        return False
    return True


def check_data(cfg: DataCheckConfig) -> int:
    """Run the check; returns the exit status (see the module docstring)."""
    if not cfg.path:
        raise ChatsmithError("give the data file to check: chatsmith data check FILE")
    kind = cfg.kind
    if cfg.stage:
        kind = STAGE_KINDS[cfg.stage]
        if cfg.kind and cfg.kind != kind:
            raise ChatsmithError(f"--for {cfg.stage} reads {kind} data, but --kind {cfg.kind} was given")
    result = load_examples(cfg.path, format=cfg.format, on_bad_row="skip", kind=kind, allow_empty=True)
    how = "auto-detected" if result.format_detected else "given"
    print(f"file:    {result.path}")
    print(f"format:  {result.format} ({how}), used as {result.kind} data")
    print(f"rows:    {result.rows_read} read, {len(result.examples)} usable, {len(result.bad_rows)} bad")
    if result.bad_rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in result.skipped_by_reason().items())
        print(f"bad rows ({reasons}):")
        for bad in result.bad_rows[:cfg.show_bad]:
            print(f"  {bad}")
        if len(result.bad_rows) > cfg.show_bad:
            print(f"  ... and {len(result.bad_rows) - cfg.show_bad} more")

    rendered_ok = stage_ok = True
    stage = cfg.stage or KIND_STAGES[result.kind]
    if cfg.tokenizer:
        tokenizer = _load_tokenizer(cfg.tokenizer)
        rendered_ok = _token_report(cfg, result, tokenizer)
        if rendered_ok and result.examples and stage != "pretrain":
            from chatsmith.chat.templates import get_format

            stage_ok = stage_rules(cfg, result, stage, tokenizer, get_format(cfg.template, tokenizer))
    elif cfg.template or cfg.max_len or cfg.stage:
        print(f"token lengths and the length rules of {stage}: give --tokenizer DIR (a model or tokenizer "
              "directory) to see them")

    if not result.examples:
        print("result:  FAILED (no usable rows)")
        return 1
    if result.bad_rows and cfg.on_bad_row == "error":
        print(f"result:  FAILED ({len(result.bad_rows)} bad rows; training stops on them: fix them or pass "
              "--on-bad-row skip)")
        return 1
    if not rendered_ok:
        print("result:  FAILED (some rows cannot be rendered with this chat template)")
        return 1
    if not stage_ok:
        print(f"result:  FAILED (`chatsmith {stage}` would refuse this file)")
        return 1
    skipped = f" ({len(result.bad_rows)} bad rows would be skipped)" if result.bad_rows else ""
    print(f"result:  OK{skipped}")
    return 0
