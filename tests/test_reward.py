"""Reward model: last-token pooling under any padding, tokenisation, training on a toy task, saving, scoring."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from conftest import tiny_llama_config, write_jsonl

from chatsmith.data.formats import split_train_eval
from chatsmith.reward_model import RewardModel, render_for_scoring, sequence_rewards, token_scores
from chatsmith.train.reward import reward_model_from_causal_lm

FACTS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
         ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]


def toy_preferences(n: int = 40, seed: int = 0, ranked_every: int = 5) -> list[dict]:
    """Separable preferences: a helpful answer beats a rude refusal; some rows are 3-way rankings."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        country, capital = FACTS[i % len(FACTS)]
        prompt = [{"role": "user", "content": f"What is the capital of {country}?"}]
        good = f"The capital of {country} is {capital}."
        bad = rng.choice(["No. Go away.", "I won't help you, idiot.", "Whatever, figure it out yourself."])
        if ranked_every and i % ranked_every == 0:
            rows.append({"prompt": prompt, "ranked": [good, f"It is {capital}, I think.", bad]})
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def _seq_cls(tokenizer, pad_token_id):
    import transformers

    torch.manual_seed(1)
    cfg = tiny_llama_config(tokenizer, num_labels=1)
    cfg.pad_token_id = pad_token_id
    return transformers.LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_pooling_left_right_padding(chat_tokenizer, pad_is_eos):
    """The reward is read at the last real token whatever the padding side, also when pad == eos."""
    eos = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = eos if pad_is_eos else chat_tokenizer.pad_token_id
    model = _seq_cls(chat_tokenizer, pad)
    seqs = [[10, 11, 12, 13, eos], [20, 21, eos], [30, 31, 32, 33, 34, 35, eos]]
    width = max(map(len, seqs))
    right = torch.full((3, width), pad)
    left = torch.full((3, width), pad)
    right_mask = torch.zeros(3, width, dtype=torch.long)
    left_mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, :len(s)] = torch.tensor(s)
        right_mask[i, :len(s)] = 1
        left[i, width - len(s):] = torch.tensor(s)
        left_mask[i, width - len(s):] = 1
    with torch.no_grad():   # reference: each sequence alone, head at its final position
        alone = torch.stack([model.score(model.model(torch.tensor([s])).last_hidden_state[0, -1])[0] for s in seqs])
        r_right = sequence_rewards(model, right, right_mask)
        r_left = sequence_rewards(model, left, left_mask)
        per_token = token_scores(model, right, right_mask)
    torch.testing.assert_close(r_right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_token[torch.arange(3), torch.tensor([4, 2, 6])], alone, atol=1e-5, rtol=1e-5)
    if pad_is_eos:
        # HF's own pooling looks for the last non-pad id and so misses an end-of-turn that equals pad.
        with torch.no_grad():
            hf = model(right, attention_mask=right_mask).logits[:, 0]
        assert not torch.allclose(hf, alone, atol=1e-4)


def test_reward_model_init_shares_the_sft_transformer(chat_tokenizer):
    import transformers

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(tiny_llama_config(chat_tokenizer)).eval()
    rm = reward_model_from_causal_lm(lm, chat_tokenizer, seed=3).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(rm.model(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == chat_tokenizer.pad_token_id
    std = rm.score.weight.std().item()
    assert 0.5 / (33 ** 0.5) < std < 2.0 / (33 ** 0.5)        # N(0, 1/sqrt(h+1)), h = 32


def test_reward_model_from_a_causal_lm_with_dropout_is_deterministic(chat_tokenizer):
    """The SFT model's dropout rates are not carried over: a reward is a fixed function of the text,
    in train mode too (the Trainer trains it in train mode)."""
    import transformers

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(tiny_llama_config(chat_tokenizer, attention_dropout=0.5))
    rm = reward_model_from_causal_lm(lm, chat_tokenizer, seed=3).train()
    assert rm.config.attention_dropout == 0.0 and lm.config.attention_dropout == 0.5
    ids, mask = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.ones(1, 6, dtype=torch.long)
    torch.testing.assert_close(sequence_rewards(rm, ids, mask), sequence_rewards(rm, ids, mask), rtol=0, atol=0)


def test_render_for_scoring_ends_at_end_of_turn(chat_tokenizer):
    from chatsmith.chat.templates import get_format

    fmt = get_format("chatml")
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    ids, mask, cut = render_for_scoring(msgs, chat_tokenizer, fmt)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == im_end and not cut
    reply = [i for i, m in zip(ids, mask) if m]
    assert chat_tokenizer.decode(reply) == "Paris.<|im_end|>"          # final reply only, not "Hello there"
    short, short_mask, cut = render_for_scoring(msgs, chat_tokenizer, fmt, max_len=6)
    assert cut and len(short) == 6 and short == ids[-6:] and short_mask == mask[-6:]
    from chatsmith.errors import DataError

    with pytest.raises(DataError, match="last message"):
        render_for_scoring(msgs[:2], chat_tokenizer, fmt, where="x.jsonl:3")


def test_split_is_deterministic_and_disjoint():
    train, held = split_train_eval(100, 0.1)
    assert (train, held) == split_train_eval(100, 0.1)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    assert len(split_train_eval(5, 0.05)[1]) == 1


def test_score_token_ids_order_and_normalisation(chat_tokenizer):
    from chatsmith.chat.templates import get_format

    model = _seq_cls(chat_tokenizer, chat_tokenizer.pad_token_id)
    rm = RewardModel(model, chat_tokenizer, get_format("chatml"), mean=0.5, std=2.0)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    raw = rm.score_token_ids(seqs, batch_size=2, normalize=False)
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s])).logits[0, 0] for s in seqs])
    torch.testing.assert_close(raw, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.score_token_ids(seqs, batch_size=2), (alone - 0.5) / 2.0, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- end to end

def test_train_reward_model_end_to_end(tmp_path, sft_dir, capsys):
    pytest.importorskip("chatsmith.model")
    import transformers

    from chatsmith.reward_model import NORM_STD_KEY, load_reward_model, score_conversations
    from chatsmith.train.reward import RewardConfig, ScoreConfig, score, train_reward_model
    from chatsmith.utils import read_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(48))
    out = tmp_path / "rm"
    common = dict(model=str(sft_dir), data=data, out=str(out), batch_size=8, max_len=64, eval_fraction=0.25,
                  norm_samples=4, norm_max_new_tokens=4, progress=False, seed=0)
    untrained = train_reward_model(RewardConfig(**common, max_steps=1, lr=1e-9, warmup_steps=0))
    result = train_reward_model(RewardConfig(**common, max_steps=12, lr=3e-3, warmup_steps=2))
    assert result["eval_pairs"] > 10
    assert result["eval_accuracy"] >= 0.9
    assert result["eval_accuracy"] >= untrained["eval_accuracy"] + 0.2       # untrained: about chance
    assert result["eval_margin"] > untrained["eval_margin"] + 0.5
    assert result["reward_norm_source"] in ("sft_samples", "preference_responses")
    assert result["eval_accuracy_by_group"]["all"]["pairs"] == result["eval_pairs"]
    assert json.loads((out / "reward_normalization.json").read_text())["std"] == pytest.approx(result["reward_std"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert any("accuracy" in r for r in rows) and rows[-1]["reward_std"] > 0

    # a standard HF directory: plain transformers loads it and scores right-padded input at the last token
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    assert getattr(hf.config, NORM_STD_KEY) == pytest.approx(result["reward_std"])
    rm = load_reward_model(out, device="cpu")
    assert (rm.mean, rm.std) == (pytest.approx(result["reward_mean"]), pytest.approx(result["reward_std"]))
    convs = [[{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": a}]
             for a in ("The capital of Peru is Lima.", "No. Go away.", "Lima")]
    raw = score_conversations(rm, rm.tokenizer, rm.fmt, convs, batch_size=4, normalize=False)
    ids = [render_for_scoring(c, rm.tokenizer, rm.fmt)[0] for c in convs]
    width = max(map(len, ids))
    padded = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(i) for i in ids])[:, None]).long()
    with torch.no_grad():
        hf_scores = hf(input_ids=padded, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(raw, hf_scores, atol=1e-4, rtol=1e-4)
    normed = score_conversations(rm, None, None, convs)
    torch.testing.assert_close(normed, (raw - rm.mean) / rm.std)
    assert normed[0] > normed[1]                 # the helpful answer beats the rude one

    # chatsmith score
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"messages": c} for c in convs])
    summary = score(ScoreConfig(reward_model=str(out), data=responses, out=str(tmp_path / "s.jsonl"), device="cpu"))
    written = read_jsonl(tmp_path / "s.jsonl")
    assert summary["n"] == 3 and [r["raw_score"] for r in written] == pytest.approx(raw.tolist(), abs=1e-4)
    assert "responses.jsonl:1" in capsys.readouterr().out


def test_reward_data_errors_name_the_row(tmp_path, sft_dir):
    pytest.importorskip("chatsmith.model")
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.reward import RewardConfig, train_reward_model

    with pytest.raises(ChatsmithError, match="not found"):
        train_reward_model(RewardConfig(model=str(sft_dir), data=str(tmp_path / "missing.jsonl"),
                                        out=str(tmp_path / "rm"), progress=False))


def test_a_causal_lm_is_not_loaded_as_a_reward_model(sft_dir):
    from chatsmith.errors import ChatsmithError
    from chatsmith.reward_model import load_reward_model

    with pytest.raises(ChatsmithError, match=r"this is a causal LM \(LlamaForCausalLM\), not a reward model; "
                                             r"train one with `chatsmith reward`"):
        load_reward_model(sft_dir, device="cpu")


def test_a_reward_ensemble_scores_the_mean_of_its_members(tmp_path, sft_dir):
    """--ensemble 3: members differing only in their seed, in OUT and OUT/members/; loading OUT gives the mean
    of the members' normalised scores; PPO's scorer uses it; training OUT again alone drops the members."""
    from chatsmith.errors import ChatsmithError
    from chatsmith.reward_model import ENSEMBLE_FILE, RewardEnsemble, load_reward_model, score_conversations
    from chatsmith.train.reward import RewardConfig, train_reward_model
    from chatsmith.train.rollout import make_scorer

    data = write_jsonl(tmp_path / "prefs.jsonl", toy_preferences(48))
    out = tmp_path / "rm"
    cfg = RewardConfig(model=str(sft_dir), data=data, out=str(out), batch_size=8, max_len=64, eval_fraction=0.25,
                       norm_samples=4, norm_max_new_tokens=4, progress=False, seed=5, max_steps=6, lr=3e-3,
                       ensemble=3)
    summary = train_reward_model(cfg)
    assert len(summary["ensemble_eval_accuracy"]) == 3
    assert json.loads((out / ENSEMBLE_FILE).read_text())["members"] == ["members/member-1", "members/member-2"]
    seeds = [yaml_seed(out), yaml_seed(out / "members/member-1"), yaml_seed(out / "members/member-2")]
    assert seeds == [5, 6, 7]

    convs = [[{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": a}]
             for a in ("The capital of Peru is Lima.", "No. Go away.", "Lima")]
    ensemble = load_reward_model(out, device="cpu")
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 3
    alone = [score_conversations(load_reward_model(d, device="cpu", ensemble=False), conversations=convs)
             for d in (out, out / "members/member-1", out / "members/member-2")]
    assert not torch.allclose(alone[0], alone[1])        # other seeds, other models
    mean = torch.stack(alone).mean(0)
    torch.testing.assert_close(score_conversations(ensemble, conversations=convs), mean)

    scorer = make_scorer(str(out), ensemble.tokenizer, "cpu")
    assert isinstance(scorer.rm, RewardEnsemble)

    (out / ENSEMBLE_FILE).write_text(json.dumps({"members": ["members/gone"]}))
    with pytest.raises(ChatsmithError, match="members/gone is missing"):
        load_reward_model(out, device="cpu")
    train_reward_model(dataclasses.replace(cfg, ensemble=1, overwrite=True))
    assert not (out / ENSEMBLE_FILE).exists()
    assert not isinstance(load_reward_model(out, device="cpu"), RewardEnsemble)


def yaml_seed(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "train_config.yaml").read_text())["seed"]
