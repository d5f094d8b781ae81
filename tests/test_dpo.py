"""DPO: log-probs over response tokens only, reference precomputed once, training raises the margin, resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama_config, write_jsonl
from test_reward import toy_preferences


def _examples(rows):
    from chatsmith.data.records import PreferenceExample

    return [PreferenceExample(prompt=r["prompt"], responses=r.get("ranked") or [r["chosen"], r["rejected"]],
                              origin=f"toy:{i + 1}") for i, r in enumerate(rows)]


def test_packed_logprobs_sum_only_the_final_reply(chat_tokenizer):
    """Summed log-probs cover exactly the final reply + its end-of-turn token (multi-turn prompt included)."""
    import torch.nn.functional as F
    import transformers

    from chatsmith.chat.render import render_chat
    from chatsmith.chat.templates import get_format
    from chatsmith.train.dpo import packed_logprobs, reference_logprobs
    from chatsmith.train.preference_functional import pack_trees
    from chatsmith.train.preference_data import tokenize_preferences

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(tiny_llama_config(chat_tokenizer)).eval()
    fmt = get_format("chatml")
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "What is the capital of France?"}]
    rows = [{"prompt": prompt, "ranked": ["Paris.", "It is Paris, I think.", "No."]},
            {"prompt": prompt[-1:], "chosen": "Paris.", "rejected": "Go away."}]
    tok = tokenize_preferences(_examples(rows), chat_tokenizer, fmt, max_len=128, with_masks=True)
    batch = pack_trees(tok.trees, chat_tokenizer.pad_token_id, with_targets=True)
    with torch.no_grad():
        packed = packed_logprobs(lm, batch)
    expected = []
    for r in rows:
        for response in r.get("ranked") or [r["chosen"], r["rejected"]]:
            full = render_chat(r["prompt"] + [{"role": "assistant", "content": response}], chat_tokenizer, fmt)
            prompt_len = len(render_chat(r["prompt"], chat_tokenizer, fmt, add_generation_prompt=True).input_ids)
            ids = torch.tensor([full.input_ids])
            reply_ids = chat_tokenizer.encode(response + "<|im_end|>")
            with torch.no_grad():
                logp = F.log_softmax(lm(ids).logits[0].float(), -1)
            expected.append(sum(logp[prompt_len - 1 + j, t] for j, t in enumerate(reply_ids)))
            assert full.input_ids[prompt_len:prompt_len + len(reply_ids)] == reply_ids
    torch.testing.assert_close(packed, torch.stack(expected), atol=1e-4, rtol=1e-5)
    refs = reference_logprobs(lm, tok.trees, chat_tokenizer.pad_token_id, batch_size=1, device="cpu")
    assert [len(r) for r in refs] == [3, 2]
    torch.testing.assert_close(torch.cat(refs), packed, atol=1e-5, rtol=1e-5)


def test_dpo_raises_margin_and_saves_a_chat_model(tmp_path, sft_dir):
    import transformers

    from chatsmith.train.dpo import DPOConfig, dpo
    from chatsmith.utils import read_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(40, seed=1))
    out = tmp_path / "dpo"
    result = dpo(DPOConfig(model=str(sft_dir), data=data, out=str(out), batch_size=8, max_len=64, max_steps=12,
                           lr=3e-3, warmup_steps=1, eval_fraction=0.25, log_every=1, beta=0.1, progress=False))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and "reward_margin" in r]
    # step 1: the policy IS the reference, so the loss is log 2 and every implicit reward is 0
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["reward_margin"] > 0.5 and rows[-1]["loss"] < 0.5
    assert result["eval_reward_accuracy"] >= 0.9 and result["eval_reward_margin"] > 0.3
    assert result["eval_pairs"] >= 10
    assert (out / "checkpoint").is_dir() and (out / "dpo_summary.json").is_file()
    # a standard HF chat model directory
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.config.vocab_size >= len(tok)
    assert json.loads((out / "dpo_summary.json").read_text())["beta"] == 0.1



def test_rpo_alpha_adds_the_chosen_nll_and_keeps_chosen_replies_likely(tmp_path, sft_dir):
    """--rpo-alpha: the loss is DPO's plus alpha x the best response's per-token NLL, and the chosen replies
    end up more likely than after plain DPO on the same data."""
    from chatsmith.train.dpo import DPOConfig, dpo
    from chatsmith.utils import read_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(40, seed=1))
    common = dict(model=str(sft_dir), data=data, batch_size=8, max_len=64, max_steps=12, lr=3e-3, warmup_steps=1,
                  eval_fraction=0.0, log_every=1, beta=0.1, progress=False)
    rows = {}
    for alpha in (0.0, 1.0):
        dpo(DPOConfig(out=str(tmp_path / str(alpha)), rpo_alpha=alpha, **common))
        rows[alpha] = [r for r in read_jsonl(tmp_path / str(alpha) / "metrics.jsonl") if "loss" in r]
    first = rows[1.0][0]
    assert "chosen_nll" not in rows[0.0][0] and first["chosen_nll"] > 0.1
    # step 1: the policy is the reference, so DPO's part is log 2 for every pair
    assert first["loss"] == pytest.approx(0.693147 + first["chosen_nll"], abs=1e-3)
    assert rows[1.0][-1]["chosen_logp"] > rows[0.0][-1]["chosen_logp"] + 0.5

def test_dpo_resume_matches_uninterrupted(tmp_path, sft_dir, monkeypatch):
    from chatsmith.train import supervised
    from chatsmith.train.dpo import DPOConfig, dpo
    from chatsmith.utils import read_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(24, seed=2))
    common = dict(model=str(sft_dir), data=data, batch_size=8, max_len=64, lr=1e-3, warmup_steps=1,
                  eval_fraction=0.0, log_every=1, save_every=2, progress=False)
    dpo(DPOConfig(out=str(tmp_path / "a"), max_steps=4, **common))
    real_step = supervised.Trainer.train_step

    def crash_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(supervised.Trainer, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):       # interrupted after the step-2 checkpoint
        dpo(DPOConfig(out=str(tmp_path / "b"), max_steps=4, **common))
    monkeypatch.setattr(supervised.Trainer, "train_step", real_step)
    dpo(DPOConfig(out=str(tmp_path / "b"), max_steps=4, resume=True, **common))
    losses = lambda p: [r["loss"] for r in read_jsonl(p / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert len(losses(tmp_path / "a")) == 4
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-6)


def test_dpo_rejects_bad_settings(tmp_path, sft_dir):
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.dpo import DPOConfig, dpo

    with pytest.raises(ChatsmithError, match="beta"):
        dpo(DPOConfig(model=str(sft_dir), data="x.jsonl", out=str(tmp_path / "o"), beta=0.0))
    with pytest.raises(ChatsmithError, match="not found"):
        dpo(DPOConfig(model=str(sft_dir), data=str(tmp_path / "none.jsonl"), out=str(tmp_path / "o")))


def test_a_short_run_precomputes_only_the_examples_it_trains_on(tmp_path, sft_dir, monkeypatch, capsys):
    from chatsmith.train import dpo as dpo_module
    from chatsmith.train.dpo import DPOConfig, dpo
    from chatsmith.utils import read_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(40, seed=3))
    counted = []
    real = dpo_module.reference_logprobs

    def spy(model, trees, *args, **kwargs):
        counted.append(len(trees))
        return real(model, trees, *args, **kwargs)

    monkeypatch.setattr(dpo_module, "reference_logprobs", spy)
    common = dict(model=str(sft_dir), data=data, batch_size=4, max_len=64, max_steps=2, eval_fraction=0.0,
                  log_every=1, save_every=0, progress=False)
    dpo(DPOConfig(out=str(tmp_path / "a"), **common))
    assert counted[0] == 8                            # 2 steps x 4 examples, not all 40
    assert "use 8 of the 40 training examples" in capsys.readouterr().err
    dpo(DPOConfig(out=str(tmp_path / "b"), **common))  # the subset is seeded: the same run twice
    losses = lambda p: [r["loss"] for r in read_jsonl(p / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
