"""Mixed precision and `--dry-run`: the dtype each `--dtype` resolves to, fp32 losses under bf16 autocast, a bf16
SFT step that learns, fp16 refused off CUDA, the memory estimator against a hand-computed case, and `--dry-run`
printing its table and exiting 0 on every training command without creating --out.

Run: python -m pytest tests/test_precision.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_run_inputs

from chatsmith.cli import main
from chatsmith.errors import ChatsmithError
from chatsmith.train.devices import Precision, resolve_dtype
from chatsmith.train.memory import estimate_training_memory, format_bytes, inference_memory, model_shape


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny chat model, a tiny reward model and SFT data."""
    return write_tiny_run_inputs(tmp_path_factory.mktemp("inputs"), reward_model=True)


def test_dtype_flags_resolve_and_fp16_is_refused_off_cuda():
    assert resolve_dtype("auto", "cpu") is None
    assert resolve_dtype("fp32", "cpu") is None
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ChatsmithError, match=r"--dtype fp16: needs a CUDA GPU.*cpu.*bf16 or fp32"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ChatsmithError, match="--dtype: expected one of auto, bf16, fp16, fp32"):
        resolve_dtype("int4", "cpu")
    plain = Precision(None, "cpu")
    assert plain.scaler is None and not plain.tolerates_overflow() and plain.state_dict() == {}


def test_fp16_loss_scaling_skips_an_overflowing_step_and_unscales_the_others():
    """The scaler logic `--dtype fp16` uses on CUDA, run with PyTorch's CPU GradScaler (no GPU here)."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision(torch.float16, "cpu")
    assert precision.tolerates_overflow() and precision.scaler.get_scale() == 65536.0

    def step(loss):
        precision.backward(loss)
        precision.unscale(optimizer)
        grad = weight.grad.clone()
        precision.step(optimizer)
        precision.update()
        optimizer.zero_grad(set_to_none=True)
        return grad

    assert torch.equal(step((weight * 2).sum()), torch.full((3,), 2.0))    # unscaled before clipping reads it
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))
    grad = step((weight * float("inf")).sum())                              # overflow: skipped, scale halves
    assert not torch.isfinite(grad).all() and torch.allclose(weight.detach(), torch.full((3,), 0.8))
    assert precision.scaler.get_scale() == 32768.0
    restored = Precision(torch.float16, "cpu")
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == 32768.0                           # resumes with the same scale


def test_logprobs_and_lm_loss_are_fp32_given_bf16_logits():
    from chatsmith.train.preference_functional import token_logprobs
    from chatsmith.train.rl_functional import entropy_from_logits, logprobs_from_logits

    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    tokens = torch.randint(0, 11, (2, 5))
    for out in (logprobs_from_logits(logits, tokens), token_logprobs(logits, tokens), entropy_from_logits(logits)):
        assert out.dtype == torch.float32
    exact = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tokens), exact)


def test_models_load_with_sdpa_attention(files):
    from chatsmith.model import load_model

    loaded = load_model(files / "model", device="cpu", template="chatml")
    assert loaded.model.config._attn_implementation == "sdpa"


def sft_args(files: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(files / "model"), "--data", str(files / "sft.jsonl"), "--template", "chatml",
            "--out", str(out), "--max-steps", "6", "--batch-size", "4", "--max-len", "64", "--lr", "3e-3",
            "--warmup-steps", "0", "--log-every", "1", "--eval-fraction", "0", "--device", "cpu", "--no-progress",
            "--save-every", "0", *extra]


def test_bf16_autocast_sft_lowers_the_loss_with_fp32_weights(files, tmp_path):
    from safetensors.torch import load_file

    from chatsmith.utils import read_metrics

    assert main(sft_args(files, tmp_path / "bf16", "--dtype", "bf16")) == 0
    losses = [row["loss"] for row in read_metrics(tmp_path / "bf16") if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}     # master weights stay fp32
    state = torch.load(tmp_path / "bf16" / "checkpoint" / "state.pt", weights_only=False)
    moments = [s["exp_avg_sq"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)  # so does AdamW's state


def test_fp16_on_cpu_is_one_clear_error_before_out_is_made(files, tmp_path, capsys):
    assert main(sft_args(files, tmp_path / "fp16", "--dtype", "fp16")) == 2
    err = capsys.readouterr().err
    assert "--dtype fp16: needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "fp16").exists()


# ----------------------------------------------------------------------------- memory estimate

def test_estimate_matches_a_hand_computed_case():
    # 1000 params all trainable, bf16: weights 1000*4 + cast cache 1000*2 = 6000; grads 4000; AdamW 8000
    # (4 + 4 + 8 = the 16 bytes/param rule); activations: 2 layers * 34*(2*8)*16 bytes = 17408, logits
    # 2*8 tokens * 100 vocab * (2 + 4) = 9600.
    est = estimate_training_memory(params=1000, trainable=1000, hidden_size=16, num_layers=2, vocab_size=100,
                                   batch_size=2, seq_len=8, dtype="bf16")
    assert (est.weights, est.gradients, est.optimizer, est.activations) == (6000, 4000, 8000, 17408 + 9600)
    assert est.total == 6000 + 4000 + 8000 + 27008
    # fp32, checkpointing: one stored input per layer (2*16*16*4 = 2048) + one layer recomputed (34*16*16*2)
    ckpt = estimate_training_memory(params=1000, trainable=1000, hidden_size=16, num_layers=2, vocab_size=100,
                                    batch_size=2, seq_len=8, dtype="fp32", activation_checkpointing=True)
    assert ckpt.weights == 4000 and ckpt.activations == 2048 + 17408 + 16 * 100 * 8
    # LoRA-style: 10 of 1000 trainable, FSDP over 2: states shrink, frozen weights still cost 4 bytes each
    lora = estimate_training_memory(params=1000, trainable=10, hidden_size=16, num_layers=2, vocab_size=100,
                                    batch_size=2, seq_len=8, dtype="fp32", parallel="fsdp", world_size=2)
    assert (lora.weights, lora.gradients, lora.optimizer) == (2000, 20, 40)
    assert inference_memory(params=1000).total == 4000
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**30) == "3.0 GiB"
    with pytest.raises(ChatsmithError, match="trainable"):
        estimate_training_memory(params=10, trainable=11, hidden_size=1, num_layers=1, vocab_size=1, batch_size=1,
                                 seq_len=1)


def test_model_shape_counts_parameters_without_loading_weights(files):
    from transformers import AutoModelForCausalLM

    shape = model_shape("policy", str(files / "model"), True)
    real = AutoModelForCausalLM.from_pretrained(str(files / "model"))
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (32, 2, real.config.vocab_size)


@pytest.mark.parametrize("command", ["pretrain", "sft", "reward", "dpo", "ppo", "grpo", "rlhf"])
def test_dry_run_prints_the_estimate_and_writes_nothing(command, files, tmp_path, capsys):
    out = tmp_path / "out"
    model_flag = {"pretrain": [], "ppo": ["--policy", str(files / "model"), "--reward-model", str(files / "rm")],
                  "rlhf": ["--policy", str(files / "model")],
                  "grpo": ["--model", str(files / "model"), "--reward", f"rm:{files / 'rm'}"]}
    args = [command, *model_flag.get(command, ["--model", str(files / "model")]), "--out", str(out), "--dry-run",
            "--device", "cpu", "--data", str(tmp_path / "missing.jsonl")] if command not in ("ppo", "grpo", "rlhf") \
        else [command, *model_flag[command], "--out", str(out), "--dry-run", "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "estimated peak memory per device" in text and "parameters" in text and "trainable" in text
    assert not out.exists()
    if command in ("dpo", "ppo"):
        assert "reference" in text
    if command == "sft":
        params = model_shape("m", str(files / "model"), True).params
        assert f"{params:,} parameters, {params:,} trainable" in text
