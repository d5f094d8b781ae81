"""Tests for `chatsmith quantize --int8` (chatsmith.quantize): size on disk, reload through load_model,
generation on the int8 model (fast and generic decoders), closeness to the fp32 model, refusal by
training commands, clear errors, and CLI output free of torchao's import noise.

    python -m pytest tests/test_quantize.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatsmith.cli import main
from chatsmith.generate import SamplingConfig, generate
from chatsmith.model import load_model, save_model
from chatsmith.quantize import (INT8_MARKER, INT8_WEIGHTS, Int8Embedding, Int8Linear, directory_weight_bytes,
                                is_int8_dir)

PROMPTS = ["The capital of France", "Python is", "Hello, how can I help you today? I", "2 +", "Café"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer):
    """(fp32 dir, int8 dir): a tiny Llama (hidden 64, GQA, tied LM head) saved by chatsmith, then quantized
    with the CLI."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.02,
                      pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp("int8")
    fp32, int8 = root / "fp32", root / "int8"
    save_model(LlamaForCausalLM(cfg).eval(), tiny_tokenizer, fp32)
    assert main(["quantize", str(fp32), "--int8", "--out", str(int8)]) == 0
    return fp32, int8


def test_int8_directory_is_smaller_and_marked(pair):
    fp32, int8 = pair
    assert is_int8_dir(int8) and not is_int8_dir(fp32)
    assert (int8 / INT8_WEIGHTS).is_file() and not (int8 / "model.safetensors").exists()
    marker = json.loads((int8 / INT8_MARKER).read_text())
    assert marker["tied_lm_head"] is True and marker["source"] == str(fp32)
    # int8 rows plus one fp32 scale per row: (64 + 4) / (64 * 4) of fp32, plus the fp32 norms
    assert directory_weight_bytes(int8) <= 0.3 * directory_weight_bytes(fp32)


def test_reloads_with_int8_layers_and_close_logits(pair, tiny_tokenizer):
    fp32, int8 = pair
    f, q = load_model(fp32, require_template=False), load_model(int8, require_template=False)
    linears = [m for m in q.model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 7 + 1 and isinstance(q.model.get_input_embeddings(), Int8Embedding)
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert q.model.lm_head.weight is q.model.get_input_embeddings().weight    # tied: one int8 copy
    ids = torch.tensor([tiny_tokenizer.encode(" ".join(PROMPTS))])
    with torch.no_grad():
        a, b = f.model(ids).logits, q.model(ids).logits
    # Each int8 weight errs by up to half a step (max|row|/254: ~0.7% of a Gaussian row's RMS) and, on x86,
    # each activation is rounded to 7 bits with one scale per call (~1% of its RMS); over 15 matrices that
    # measured 2.7% relative RMS error of the logits here (1.1% with weight-only int8 and bf16 activations).
    # 8% leaves room for other seeds and kernels, while a wrong scale, a transposed weight or a lost bias
    # errs by 50-100%.
    assert (a - b).norm() <= 0.08 * a.norm()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_generate_on_int8_agrees_with_fp32_and_fast_path_equals_generic(pair, tiny_tokenizer):
    fp32, int8 = pair
    f, q = load_model(fp32, require_template=False), load_model(int8, require_template=False)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    fast = generate(q.model, tiny_tokenizer, prompts, cfg, fast=True).sequences
    assert generate(q.model, tiny_tokenizer, prompts, cfg, fast=False).sequences == fast
    ref = generate(f.model, tiny_tokenizer, prompts, cfg).sequences
    # Free-running greedy rows diverge for good after one near-tie flips, so agreement is measured teacher-forced:
    # fed the fp32 model's continuation, the int8 model picks the same next token at nearly every position.
    same = total = 0
    with torch.no_grad():
        for prompt, cont in zip(prompts, ref):
            logits = q.model(torch.tensor([prompt + cont[:-1]])).logits[0, len(prompt) - 1:]
            same += int((logits.argmax(-1) == torch.tensor(cont)).sum())
            total += len(cont)
    assert same / total >= 0.85, (same, total)
    assert [r[0] for r in ref] == [r[0] for r in fast]           # and every first token is the same


def test_generate_and_eval_loaders_take_int8(pair, capsys):
    _, int8 = pair
    assert main(["generate", str(int8), "--prompt", "The capital of", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    from chatsmith.eval.behaviour import load_model_under_test

    under_test = load_model_under_test(int8, "q", base_names=("q",))
    assert isinstance(under_test.model.lm_head, Int8Linear)


def test_training_refuses_int8(pair, tmp_path, capsys):
    _, int8 = pair
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    for argv in (["sft", "--model", str(int8)], ["grpo", "--model", str(int8), "--prompts", str(data)],
                 ["ppo", "--policy", str(int8), "--prompts", str(data)]):
        assert main(argv + ["--data", str(data), "--out", str(tmp_path / "out")] if argv[0] == "sft"
                    else argv + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "int8 model" in err and "inference only" in err and str(int8) in err, err
    assert not (tmp_path / "out").exists()


def test_quantize_bad_input(pair, tmp_path, capsys):
    fp32, int8 = pair
    cases = [
        (["quantize", str(tmp_path / "nope"), "--int8", "--out", str(tmp_path / "a")], "model directory not found"),
        (["quantize", str(tmp_path), "--int8", "--out", str(tmp_path / "b")], "no config.json"),
        (["quantize", str(fp32), "--int8", "--out", str(int8)], "already exists"),
        (["quantize", str(fp32), "--out", str(tmp_path / "c")], "--int8"),
        (["quantize", str(int8), "--int8", "--out", str(tmp_path / "d")], "already an int8 model"),
        (["quantize", str(fp32), "--int8"], "--out"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_damaged_int8_directory_is_one_clear_error(pair, tmp_path):
    import shutil

    from chatsmith.errors import ChatsmithError

    _, int8 = pair
    broken = tmp_path / "broken"
    shutil.copytree(int8, broken)
    (broken / INT8_WEIGHTS).unlink()
    with pytest.raises(ChatsmithError, match=INT8_WEIGHTS):
        load_model(broken, require_template=False)


def test_cli_stderr_has_no_torchao_import_noise(pair, tmp_path):
    fp32, _ = pair
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    for argv in (["--help"], ["quantize", str(fp32), "--int8", "--out", str(tmp_path / "q")]):
        proc = subprocess.run([sys.executable, "-m", "chatsmith", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "Failed to load" not in proc.stderr and "KernelPreference" not in proc.stderr, proc.stderr
        assert "Enum subclass" not in proc.stderr, proc.stderr
    assert is_int8_dir(tmp_path / "q")
