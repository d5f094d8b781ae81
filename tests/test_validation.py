"""Settings, reward models and data rows are checked before any work, with one clear line and exit code 2.

- every numeric setting has declared bounds (`chatsmith.config.arg(min=..., max=...)`), checked by
  `validate_config` for flags, YAML and Python callers alike; nan/inf are refused; devices must exist;
- a reward-model argument must name a trained reward model, not a causal LM;
- preference rows and prompts longer than the limit are dropped whole, and `data check --for STAGE`
  applies the same rules (the same functions) as the stage;
- a hypothesis fuzz test of every numeric flag of every command: a clean error naming the flag, or a
  config that validates with the value in its declared range.

Run: python -m pytest tests/test_validation.py -q
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from conftest import tiny_llama_config, write_jsonl
from hypothesis import strategies as st

from chatsmith.cli import COMMANDS, build_parser, main
from chatsmith.config import (config_from_dict, config_from_namespace, field_metadata, flag_name,
                              validate_config)
from chatsmith.errors import ChatsmithError

U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "Paris is the capital of France."}


# ----------------------------------------------------------------------------- settings

BAD_SETTINGS = [
    (["sft", "--lr", "0"], "--lr: expected a finite number > 0, got 0.0"),
    (["sft", "--lr", "-1"], "--lr: expected a finite number > 0, got -1.0"),
    (["sft", "--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["sft", "--learning-rate", "inf"], "--lr: expected a finite number > 0, got inf"),
    (["sft", "--eval-fraction", "1.5"], "--eval-fraction: expected a finite number in [0, 1), got 1.5"),
    (["sft", "--eval-fraction", "1"], "--eval-fraction: expected a finite number in [0, 1), got 1.0"),
    (["sft", "--warmup-steps", "-5"], "--warmup-steps: expected an integer >= 0, got -5"),
    (["sft", "--epochs", "-1"], "--epochs: expected a finite number >= 0, got -1.0"),
    (["sft", "--grad-clip", "nan"], "--grad-clip: expected a finite number >= 0, got nan"),
    (["sft", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["sft", "--grad-accum", "0"], "--grad-accum: expected an integer >= 1, got 0"),
    (["sft", "--max-len", "0"], "--max-len: expected an integer >= 1, got 0"),
    (["sft", "--max-steps", "0"], "--max-steps: expected an integer >= 1 when --epochs is 0, got 0"),
    (["sft", "--max-steps", "1.5"], "--max-steps: expected int, got '1.5'"),
    (["sft", "--seed", "-1"], "--seed: expected an integer in [0, 9223372036854775807], got -1"),
    (["pretrain", "--max-steps", "0"], "--max-steps: expected an integer >= 1, got 0"),
    (["pretrain", "--min-lr-ratio", "2"], "--min-lr-ratio: expected a finite number in [0, 1], got 2.0"),
    (["reward", "--norm-temperature", "0"], "--norm-temperature: expected a finite number > 0, got 0.0"),
    (["dpo", "--beta", "0"], "--beta: expected a finite number > 0, got 0.0"),
    (["dpo", "--label-smoothing", "0.5"], "--label-smoothing: expected a finite number in [0, 0.5), got 0.5"),
    (["dpo", "--epochs", "0"], "--max-steps: expected an integer >= 1 when --epochs is 0, got 0"),
    (["ppo", "--temperature", "nan"], "--temperature: expected a finite number > 0, got nan"),
    (["ppo", "--temperature", "0"], "--temperature: expected a finite number > 0, got 0.0"),
    (["ppo", "--kl-coef", "-0.1"], "--kl-coef: expected a finite number >= 0, got -0.1"),
    (["ppo", "--gamma", "1.1"], "--gamma: expected a finite number in [0, 1], got 1.1"),
    (["ppo", "--max-new-tokens", "100000000"],
     "--max-new-tokens: expected an integer < --max-len (256) so that a prompt fits, got 100000000"),
    (["ppo", "--rollout-batch-size", "10"], "--rollout-batch-size 10 must be a multiple of the minibatch"),
    (["grpo", "--num-generations", "1"], "--num-generations: expected an integer >= 2, got 1"),
    (["grpo", "--beta", "-1"], "--beta: expected a finite number >= 0, got -1.0"),
    (["rlhf", "--rm-lr", "0"], "--rm-lr: expected a finite number > 0, got 0.0"),
    (["generate", "m", "--temperature", "nan"], "--temperature: expected a finite number >= 0, got nan"),
    (["generate", "m", "--top-p", "0"], "--top-p: expected a finite number in (0, 1], got 0.0"),
    (["chat", "m", "--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1, got 0"),
    (["eval", "m", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["score", "rm", "--batch-size", "-3"], "--batch-size: expected an integer >= 1, got -3"),
    (["data", "check", "f.jsonl", "--max-len", "0"], "--max-len: expected an integer >= 1, got 0"),
    (["world", "export", "w", "--scale", "0"], "--scale: expected a finite number > 0, got 0.0"),
    (["sft", "--device", "banana"], "--device: expected cpu, cuda, cuda:N, mps or auto, got 'banana'"),
]


@pytest.mark.parametrize("argv,message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_setting_exits_2_naming_the_flag(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "ppo":     # ppo checks its minibatch split once the flags are valid: give it real files
        argv = argv + ["--policy", "nowhere", "--out", "out"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []            # nothing was written


def test_yaml_settings_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: .nan\n")
    assert main(["sft", "--config", str(config)]) == 2
    assert "--lr: expected a finite number > 0, got nan" in capsys.readouterr().err
    from chatsmith.train.sft import SFTConfig

    with pytest.raises(ChatsmithError, match="--eval-fraction"):
        config_from_dict(SFTConfig, {"eval_fraction": 1.0})
    with pytest.raises(ChatsmithError, match="--parallel: expected one of ddp, fsdp, got 'zero3'"):
        config_from_dict(SFTConfig, {"parallel": "zero3"})     # YAML does not go through argparse's choices
    with pytest.raises(ChatsmithError, match="field 'max_steps': expected int"):
        config_from_dict(SFTConfig, {"max_steps": float("inf")}, source="c.yaml")


def test_python_callers_are_checked_before_any_work(tmp_path):
    from chatsmith.train.dpo import DPOConfig, dpo
    from chatsmith.train.grpo import GRPOConfig, GRPOTrainer
    from chatsmith.train.ppo import PPOConfig, PPOTrainer
    from chatsmith.train.sft import SFTConfig, sft

    missing = str(tmp_path / "no-such-model")
    out = tmp_path / "out"
    cases = [(lambda: sft(SFTConfig(model=missing, out=str(out), lr=float("nan"))), "--lr"),
             (lambda: dpo(DPOConfig(model=missing, out=str(out), grad_clip=-1.0)), "--grad-clip"),
             (lambda: PPOTrainer(PPOConfig(policy=missing, out=str(out), temperature=0.0)), "--temperature"),
             (lambda: GRPOTrainer(GRPOConfig(model=missing, out=str(out), warmup_steps=-5)), "--warmup-steps")]
    for call, flag in cases:
        with pytest.raises(ChatsmithError, match=f"^{flag}: "):
            call()
    assert not out.exists()


def test_bounds_are_inherited_by_stages_that_override_a_default():
    from chatsmith.train.config import TrainConfig
    from chatsmith.train.sft import SFTConfig

    assert field_metadata(SFTConfig, "lr")["range"] == field_metadata(TrainConfig, "lr")["range"]
    assert field_metadata(SFTConfig, "max_steps")["range"].min == 0     # SFT: --epochs may stand for it
    with pytest.raises(ChatsmithError, match="--weight-decay"):
        validate_config(SFTConfig(weight_decay=-0.1))


def test_a_device_that_does_not_exist_is_refused(capsys):
    if torch.cuda.is_available():
        argv, message = ["sft", "--device", f"cuda:{torch.cuda.device_count()}"], "there is no GPU"
    else:
        argv, message = ["sft", "--device", "cuda"], "--device cuda: CUDA is not available"
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_greedy_temperature_zero_is_allowed_where_it_means_greedy():
    from chatsmith.generate.cli import GenerateConfig
    from chatsmith.generate.engine import SamplingConfig

    validate_config(GenerateConfig(temperature=0.0))
    SamplingConfig(temperature=0.0).validate()
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ChatsmithError, match="temperature"):
            SamplingConfig(temperature=bad).validate()


def test_over_large_max_new_tokens_is_capped_with_a_notice(sft_dir, capsys):
    from chatsmith.generate.cli import cap_new_tokens

    assert cap_new_tokens(10, 5, 256) == 10 and capsys.readouterr().err == ""
    assert cap_new_tokens(100_000_000, 6, 256) == 250
    assert "--max-new-tokens 100000000: capped to 250 (the model's context is 256 tokens" in capsys.readouterr().err
    assert main(["generate", sft_dir, "--prompt", "Hello", "--max-new-tokens", "100000000", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert "--max-new-tokens 100000000: capped to" in capsys.readouterr().err


def test_eval_says_once_that_answers_are_capped_to_the_context(sft_dir, capsys):
    import transformers

    from chatsmith.generate.cli import note_context_cap

    model = transformers.AutoModelForCausalLM.from_pretrained(sft_dir)
    capsys.readouterr()
    note_context_cap(model, None, 200, 56)                 # 200 + 56 = 256 fits
    assert capsys.readouterr().err == ""
    for _ in range(2):
        note_context_cap(model, None, 10, 123456789)
    err = capsys.readouterr().err
    assert err.count("--max-new-tokens 123456789: capped so that prompt + reply fit the model's context of 256") == 1


def test_rl_stages_say_when_max_len_exceeds_the_policy_context(sft_dir, capsys):
    import transformers

    from chatsmith.train.rollout import note_context_limit

    policy = transformers.AutoModelForCausalLM.from_pretrained(sft_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(sft_dir)
    capsys.readouterr()
    note_context_limit("ppo", 256, policy, tokenizer)
    assert capsys.readouterr().err == ""
    note_context_limit("grpo", 1000, policy, tokenizer)
    assert ("grpo: --max-len 1000 is more than the policy's context of 256 tokens; prompt + response are capped "
            "to 256") in capsys.readouterr().err


# ----------------------------------------------------------------------------- reward models

@pytest.fixture(scope="module")
def seq_cls_dirs(tmp_path_factory, chat_tokenizer, sft_dir):
    """`good`: num_labels 1 with its head saved; `two`: num_labels 2; `headless`: a seq-cls config whose
    weights are the causal LM's (no score head)."""
    import shutil

    import transformers

    root = tmp_path_factory.mktemp("rms")
    torch.manual_seed(1)
    good = root / "good"
    transformers.LlamaForSequenceClassification(tiny_llama_config(chat_tokenizer, num_labels=1)).save_pretrained(good)
    chat_tokenizer.save_pretrained(good)
    two = root / "two"
    transformers.LlamaForSequenceClassification(tiny_llama_config(chat_tokenizer, num_labels=2)).save_pretrained(two)
    chat_tokenizer.save_pretrained(two)
    headless = root / "headless"
    shutil.copytree(sft_dir, headless)
    config = json.loads((headless / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (headless / "config.json").write_text(json.dumps(config))
    return {"good": str(good), "two": str(two), "headless": str(headless)}


def test_a_causal_lm_is_refused_as_a_reward_model(tmp_path, sft_dir, capsys):
    from chatsmith.eval.behaviour import RewardScorer

    responses = write_jsonl(tmp_path / "r.jsonl", [{"messages": [U, A]}])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [U]}])
    expected = f"{sft_dir}: this is a causal LM (LlamaForCausalLM), not a reward model; train one with " \
               "`chatsmith reward`"
    for argv in (["score", sft_dir, "--data", responses, "--device", "cpu"],
                 ["ppo", "--policy", sft_dir, "--reward-model", sft_dir, "--prompts", prompts,
                  "--out", str(tmp_path / "ppo"), "--device", "cpu"],
                 ["grpo", "--model", sft_dir, "--reward", f"rm:{sft_dir}", "--prompts", prompts,
                  "--out", str(tmp_path / "grpo"), "--device", "cpu"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "grpo").exists()
    with pytest.raises(ChatsmithError, match="causal LM"):
        RewardScorer(sft_dir, device="cpu")          # chatsmith eval --reward-model


def test_reward_model_kind_check(seq_cls_dirs):
    from chatsmith.reward_model import load_reward_model

    rm = load_reward_model(seq_cls_dirs["good"], device="cpu")      # num_labels 1, head in the weights
    assert rm.model.config.num_labels == 1
    with pytest.raises(ChatsmithError, match=r"one output \(num_labels=1\), this one has 2"):
        load_reward_model(seq_cls_dirs["two"], device="cpu")
    with pytest.raises(ChatsmithError, match="no trained score head"):
        load_reward_model(seq_cls_dirs["headless"], device="cpu")


def test_saved_normalisation_marks_a_trained_reward_model(seq_cls_dirs, tmp_path):
    import shutil

    from chatsmith.reward_model import NORM_FILE, check_reward_model_dir

    path = tmp_path / "rm"
    shutil.copytree(seq_cls_dirs["headless"], path)
    (path / NORM_FILE).write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    check_reward_model_dir(path)                       # what `chatsmith reward` writes is accepted


# ----------------------------------------------------------------------------- over-length rows

def long_preferences():
    short = {"prompt": [U], "chosen": "Paris.", "rejected": "No."}
    long = {"prompt": [{"role": "user", "content": "Tell me about France. " * 30}], "chosen": "Paris.",
            "rejected": "No."}
    return short, long


def test_over_length_preference_rows_are_dropped_whole(chat_tokenizer):
    from chatsmith.chat.templates import get_format
    from chatsmith.data.records import PreferenceExample
    from chatsmith.reward_model import render_for_scoring
    from chatsmith.train.preference_data import tokenize_preferences

    fmt = get_format("chatml", chat_tokenizer)
    short, long = long_preferences()
    examples = [PreferenceExample(prompt=r["prompt"], responses=[r["chosen"], r["rejected"]], origin=f"f:{i}")
                for i, r in enumerate([short, long, short])]
    full = render_for_scoring(short["prompt"] + [{"role": "assistant", "content": "Paris."}], chat_tokenizer, fmt)[0]
    tok = tokenize_preferences(examples, chat_tokenizer, fmt, max_len=64)
    assert (tok.n_dropped, tok.kept, tok.origins) == (1, [0, 2], ["f:0", "f:2"])
    tree = tok.trees[0]
    assert tree.prefix + tree.suffixes[0] == full       # kept rows are whole: not a token cut


def test_reward_and_dpo_drop_rows_and_say_so_truthfully(tmp_path, sft_dir, capsys):
    from chatsmith.train.dpo import DPOConfig, dpo

    short, long = long_preferences()
    data = write_jsonl(tmp_path / "prefs.jsonl", [short, long] * 4)
    result = dpo(DPOConfig(model=sft_dir, data=data, out=str(tmp_path / "dpo"), max_len=64, max_steps=1,
                           batch_size=2, eval_fraction=0.0, progress=False, device="cpu"))
    assert result["train_examples"] == 4
    err = capsys.readouterr().err
    assert ("dpo: dropped 4 preference example(s) with a prompt + response longer than --max-len 64 tokens "
            "(whole examples are dropped, never cut)") in err
    assert "lost tokens" not in err
    only_long = write_jsonl(tmp_path / "long.jsonl", [long] * 3)
    for stage in ("reward", "dpo"):
        assert main([stage, "--model", sft_dir, "--data", only_long, "--max-len", "64", "--eval-fraction", "0",
                     "--out", str(tmp_path / f"{stage}-long"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{only_long}: no preference example fits in --max-len 64 tokens (3 dropped as longer)" in err
        assert not (tmp_path / f"{stage}-long").exists()


# ----------------------------------------------------------------------------- data check --for

@pytest.fixture(scope="module")
def tokenizer_dir(sft_dir):
    return sft_dir


def run_check(capsys, *argv):
    code = main(["data", "check", *argv])
    return code, capsys.readouterr().out


def test_data_check_for_sft_fails_when_sft_would(tmp_path, tokenizer_dir, sft_dir, capsys):
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": [U, A]}] * 4)
    code, out = run_check(capsys, path, "--for", "sft", "--tokenizer", tokenizer_dir, "--max-len", "10")
    assert code == 1
    assert "sft rules (--max-len 10, --overlength truncate): 0 conversations kept" in out
    assert f"sft would stop: {path}: no conversation left to train on" in out
    assert "result:  FAILED (`chatsmith sft` would refuse this file)" in out
    # sft itself refuses the same file with the same words
    assert main(["sft", "--model", sft_dir, "--data", path, "--max-len", "10", "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert f"{path}: no conversation left to train on" in capsys.readouterr().err
    code, out = run_check(capsys, path, "--for", "sft", "--tokenizer", tokenizer_dir)     # sft's --max-len 256
    assert code == 0 and "sft rules (--max-len 256, --overlength truncate): 4 conversations kept" in out


def test_data_check_for_sft_rejects_user_only_conversations(tmp_path, capsys):
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": [U]}] * 3)
    code, out = run_check(capsys, path)
    assert code == 0 and "used as prompt data" in out          # a fine prompt file for ppo/grpo
    code, out = run_check(capsys, path, "--for", "sft")
    assert code == 1
    assert "used as chat data" in out and "u.jsonl:1: conversation has no assistant turn" in out
    assert "result:  FAILED (no usable rows)" in out


def test_data_check_for_preference_and_prompt_stages(tmp_path, tokenizer_dir, capsys):
    short, long = long_preferences()
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [short, long])
    code, out = run_check(capsys, prefs, "--for", "dpo", "--tokenizer", tokenizer_dir, "--max-len", "64")
    assert code == 0
    assert "dpo rules (--max-len 64): 1 examples kept (1 pairs)" in out
    assert "dpo: dropped 1 preference example(s)" in out and "never cut" in out
    code, out = run_check(capsys, write_jsonl(tmp_path / "l.jsonl", [long]), "--for", "reward", "--tokenizer",
                          tokenizer_dir, "--max-len", "64")
    assert code == 1 and "reward would stop" in out and "no preference example fits in --max-len 64" in out

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"messages": [U]}, {"messages": long["prompt"]}])
    code, out = run_check(capsys, prompts, "--for", "grpo", "--tokenizer", tokenizer_dir, "--max-len", "64",
                          "--max-new-tokens", "16")
    assert code == 0 and "grpo rules (--max-len 64, --max-new-tokens 16): 1 prompts kept" in out
    assert "grpo: skipped 1 prompt(s) longer than 48 tokens" in out
    code, out = run_check(capsys, prompts, "--for", "ppo", "--tokenizer", tokenizer_dir, "--max-len", "20",
                          "--max-new-tokens", "16")
    assert code == 1 and "none of the 2 prompts fits in 4 tokens" in out


def test_data_check_for_conflicting_kind_is_an_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [U, A]}])
    assert main(["data", "check", path, "--for", "dpo", "--kind", "chat"]) == 2
    assert "--for dpo reads preference data, but --kind chat was given" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fuzz

def numeric_fields(cls) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if args[0] in (int, float) and len(args) == 1:
            out.append((f.name, args[0]))
    return out


def command_classes():
    for cmd in COMMANDS:
        if cmd.name == "demo":
            continue
        module, cls_name, _ = cmd.target.split(":")
        yield cmd, getattr(importlib.import_module(module), cls_name)


FUZZ_TARGETS = [(cmd, cls, name, tp) for cmd, cls in command_classes() for name, tp in numeric_fields(cls)]

VALUES = st.one_of(
    st.sampled_from([0, 1, -1, 2, 0.5, 1.0, 1e-9, -1e-9, 10**30, -(10**30), 2**63, 1e308, -1e308,
                     float("nan"), float("inf"), float("-inf")]),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
)


def check_outcome(cls, name, cfg_or_error, value):
    """A clean error naming the flag (or its partner in a cross-setting rule), or a valid config holding the
    value within the field's declared bounds."""
    if isinstance(cfg_or_error, ChatsmithError):
        message = str(cfg_or_error)
        assert "\n" not in message
        assert flag_name(name) in message or f"'{name}'" in message, (name, value, message)
        return
    cfg = cfg_or_error
    validate_config(cfg)
    got = getattr(cfg, name)
    assert not (isinstance(got, float) and (math.isnan(got) or math.isinf(got))), (name, value)
    bounds = field_metadata(cls, name).get("range")
    assert bounds is None or bounds.contains(got), (name, value, got)


@pytest.mark.parametrize("cmd,cls,name,tp", FUZZ_TARGETS,
                         ids=[f"{c.name}:{n}" for c, _, n, _ in FUZZ_TARGETS])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_fuzz_numeric_flags(cmd, cls, name, tp, value):
    parser, _, _ = build_parser(cmd)
    try:                                    # as a flag (the text a user types) ...
        ns = parser.parse_args([f"{flag_name(name)}={value}"])
        for pos in cmd.positional:
            delattr(ns, f"_pos_{pos}")
        outcome = config_from_namespace(cls, ns)
    except ChatsmithError as exc:
        outcome = exc
    check_outcome(cls, name, outcome, value)
    # ... and as a YAML or Python value
    try:
        outcome = config_from_dict(cls, {name: value}, source="c.yaml")
    except ChatsmithError as exc:
        outcome = exc
    check_outcome(cls, name, outcome, value)
