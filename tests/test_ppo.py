"""PPO end to end at toy size: log-probs match the sampler, a toy reward goes up, resume is exact.

Run: `python -m pytest tests/test_ppo.py -q`. Also provides the toy setup reused by test_grpo / test_rlhf.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from chatsmith.train import rl_functional as F
from chatsmith.train.rollout import PromptItem, collect_rollout, value_forward

@pytest.fixture(autouse=True)
def one_thread():
    """Hidden-32 models gain nothing from intra-op threads, and on a busy 2-core machine the threads
    spin against each other (20x slower here); run these tests single-threaded, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


USER_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Python",
                "Hello, how can I help?", "What is 2 + 2?", "Is Java an island?",
                "Say something in French.", "Where is Paris?"]


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    """The conftest BPE tokenizer with the chatml template (trained once per test process)."""
    from chatsmith.chat.templates import BUILTIN_TEMPLATES
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tokenizer


def toy_models(seed: int = 0, hidden: int = 32):
    """(policy, reference, value model, tokenizer, chat format) of a random 2-layer Llama with chatml."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from chatsmith.chat.templates import get_format

    tokenizer = toy_tokenizer()
    fmt = get_format("chatml")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, num_labels=1)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config)
    reference.load_state_dict(policy.state_dict())
    value = LlamaForSequenceClassification(config)
    return policy, reference, value, tokenizer, fmt


def toy_prompts(tokenizer, fmt, n: int | None = None) -> list[PromptItem]:
    from chatsmith.chat.render import render_prompt

    users = USER_PROMPTS if n is None else (USER_PROMPTS * n)[:n]
    items = []
    for i, text in enumerate(users):
        messages = [{"role": "user", "content": text}]
        items.append(PromptItem(messages, f"toy:{i + 1}", {"id": str(i)}, render_prompt(messages, tokenizer, fmt)))
    return items


class TokenSetReward:
    """Toy reward: the fraction of response tokens that belong to a fixed set (about 1/8 of the vocab)."""

    def __init__(self, vocab_size: int, every: int = 8, fail_on_call: int | None = None):
        self.vocab_size, self.every, self.calls, self.fail_on_call = vocab_size, every, 0, fail_on_call

    def in_set(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids % self.every == 3).float()

    def __call__(self, rollout, prompts=None) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated crash")
        return F.masked_mean(self.in_set(rollout.response_ids), rollout.response_mask, dim=-1)


def mean_toy_reward(policy, tokenizer, prompts, reward: TokenSetReward, stop_ids, n_rounds: int = 4,
                    max_new_tokens: int = 8, temperature: float = 1.0) -> float:
    """Mean toy reward over fresh samples with fixed seeds (the same seeds before and after training)."""
    total = 0.0
    for k in range(n_rounds):
        ro = collect_rollout(policy, None, tokenizer, [p.ids for p in prompts], list(range(len(prompts))),
                             max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop_ids,
                             seed=10_000 + k, need_policy_logprobs=False)
        total += float(reward(ro).mean())
    return total / n_rounds


def ppo_cfg(tmp_path, **kw):
    from chatsmith.train.ppo import PPOConfig

    base = dict(out=str(tmp_path / "ppo"), max_steps=6, rollout_batch_size=8, batch_size=4, grad_accum=1,
                ppo_epochs=2, lr=3e-3, max_new_tokens=8, temperature=1.0, kl_coef=0.01, no_eos_penalty=None,
                sample_every=0, save_every=0, progress=False, device="cpu", forward_batch_size=8,
                train_embeddings="all")   # the toy policy is random: its embeddings are part of what it learns
    base.update(kw)
    return PPOConfig(**base)


def make_trainer(cfg, scorer, seed: int = 0):
    from chatsmith.train.ppo import PPOTrainer

    policy, reference, value, tokenizer, fmt = toy_models(seed)
    return PPOTrainer(cfg, policy=policy, tokenizer=tokenizer, fmt=fmt, reference=reference, value_model=value,
                      scorer=scorer, prompts=toy_prompts(tokenizer, fmt))


# ----------------------------------------------------------------------------- rollouts

def test_rollout_logprobs_match_the_sampler_and_mask_after_end_of_turn():
    from chatsmith.generate import SamplingConfig, generate

    policy, reference, _, tokenizer, fmt = toy_models()
    prompts = toy_prompts(tokenizer, fmt)
    stop = fmt.stop_token_ids(tokenizer)
    ro = collect_rollout(policy, reference, tokenizer, [p.ids for p in prompts], list(range(len(prompts))),
                         max_new_tokens=12, temperature=0.7, stop_token_ids=stop, seed=3)
    # Same seed through the engine directly: same tokens, and its incremental log-probs agree with the
    # full-forward ones computed from logits / temperature.
    out = generate(policy, tokenizer, [p.ids for p in prompts],
                   SamplingConfig(max_new_tokens=12, temperature=0.7, seed=3, stop_token_ids=tuple(stop)))
    for i, seq in enumerate(out.sequences):
        n = int(ro.response_lengths[i])
        assert ro.response_ids[i, :n].tolist() == seq[:n]
        assert torch.allclose(ro.logprobs[i, :n], torch.tensor(out.logprobs[i][:n]), atol=1e-4)
        assert ro.response_mask[i, :n].eq(1).all() and ro.response_mask[i, n:].eq(0).all()
        assert ro.logprobs[i, n:].eq(0).all()
        assert bool(ro.finished[i]) == (n > 0 and seq[n - 1] in stop)
    # Policy and reference are identical copies: k1 KL is 0 on every token.
    assert torch.allclose(ro.logprobs, ro.ref_logprobs, atol=1e-5)


def test_micro_batches_group_similar_lengths_and_cover_every_row_once():
    from chatsmith.train.rollout import plan_micro_batches

    prompts = [10, 100, 12, 98, 11, 97, 13, 99]
    responses = [5, 5, 6, 6, 7, 7, 8, 8]
    groups = plan_micro_batches(prompts, responses, max_rows=4)
    assert sorted(i for g in groups for i in g) == list(range(8)) and all(len(g) <= 4 for g in groups)
    assert sorted(sorted(g) for g in groups) == [[0, 2, 4, 6], [1, 3, 5, 7]]     # short with short

    def cost(gs):
        return sum(64 + len(g) * (max(prompts[i] for i in g) + max(responses[i] for i in g)) for g in gs)

    assert cost(groups) < cost([[0, 1, 2, 3], [4, 5, 6, 7]])                   # beats arrival order
    assert plan_micro_batches([10] * 6, [5] * 6, max_rows=4) in ([[0, 1, 2, 3], [4, 5]], [[0, 1], [2, 3, 4, 5]],
                                                                   [[0, 1, 2], [3, 4, 5]])
    assert plan_micro_batches([], [], 4) == []


def test_trimmed_micro_batch_gives_the_full_batch_log_probs_and_values():
    from chatsmith.train.rollout import micro_batch_tensors, response_forward, rollout_micro_batches

    policy, reference, value, tokenizer, fmt = toy_models()
    prompts = toy_prompts(tokenizer, fmt)
    ro = collect_rollout(policy, reference, tokenizer, [p.ids for p in prompts], list(range(len(prompts))),
                         max_new_tokens=10, temperature=0.7, stop_token_ids=fmt.stop_token_ids(tokenizer), seed=4)
    lengths = ro.attention_mask[:, :ro.prompt_len].sum(-1)
    assert int(lengths.min()) < ro.prompt_len                     # some rows are padded, so trimming matters
    with torch.no_grad():
        full_lp, _ = response_forward(policy, ro.input_ids, ro.attention_mask, ro.prompt_len, 0.7)
        full_v = value_forward(value, ro.input_ids, ro.attention_mask, ro.prompt_len)
        groups = rollout_micro_batches(ro, range(ro.batch_size), 3)
        assert sorted(i for g in groups for i in g) == list(range(ro.batch_size))
        for rows in groups:
            ids, attention, prompt_len, r = micro_batch_tensors(ro, rows)
            assert ids.shape[1] == prompt_len + r <= ro.input_ids.shape[1]
            assert r == int(ro.response_lengths[rows].max()) or r == 1
            lp, _ = response_forward(policy, ids, attention, prompt_len, 0.7)
            v = value_forward(value, ids, attention, prompt_len)
            m = ro.response_mask[rows, :r]
            assert torch.allclose(lp * m, full_lp[rows, :r] * m, atol=1e-5)
            assert torch.allclose(v * m, full_v[rows, :r] * m, atol=1e-5)
            assert ro.response_mask[rows, r:].eq(0).all()           # nothing real was cut off


def test_forced_end_of_turn_is_masked_after():
    policy, reference, _, tokenizer, fmt = toy_models()
    stop = fmt.stop_token_ids(tokenizer)
    prompts = toy_prompts(tokenizer, fmt)

    def fake_generate(model, tok, prompt_ids, max_new_tokens, temperature, stop_ids, seed):
        # row i: i filler tokens, then end-of-turn, then junk that must be cut
        return [[50] * i + [stop[0]] + [60, 61] for i in range(len(prompt_ids))]

    ro = collect_rollout(policy, reference, tokenizer, [p.ids for p in prompts], list(range(len(prompts))),
                         max_new_tokens=16, temperature=1.0, stop_token_ids=stop, seed=0, generate_fn=fake_generate)
    assert ro.response_lengths.tolist() == [i + 1 for i in range(len(prompts))]
    assert ro.finished.all()
    for i in range(len(prompts)):
        assert ro.response_mask[i].tolist() == [1.0] * (i + 1) + [0.0] * (ro.response_mask.shape[1] - i - 1)
        assert 60 not in ro.response_ids[i][ro.response_mask[i].bool()].tolist()
    values = value_forward(toy_models()[2], ro.input_ids, ro.attention_mask, ro.prompt_len)
    assert values.shape == ro.response_mask.shape


# ----------------------------------------------------------------------------- training

def test_ppo_raises_a_toy_reward(tmp_path):
    cfg = ppo_cfg(tmp_path, max_steps=8, lr=3e-2)
    reward = TokenSetReward(vocab_size=0)
    trainer = make_trainer(cfg, reward)
    stop = trainer.stop_token_ids
    before = mean_toy_reward(trainer.policy, trainer.tokenizer, trainer.prompts, reward, stop)
    result = trainer.run()
    after = mean_toy_reward(trainer.policy, trainer.tokenizer, trainer.prompts, reward, stop)
    assert after > before + 0.08, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("score", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                "response_length", "beta", "rollout_s", "score_s", "update_s"):
        assert key in rows[-1], key
    assert rows[-1]["kl"] > 0                      # the policy moved away from the reference
    assert result.step == 8
    # The final policy is a standard HF directory; the value model sits in OUT/value.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ppo"))
    for (name, a), b in zip(trainer.policy.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ppo" / "value"))


def test_ppo_first_update_has_ratio_one_and_adaptive_beta(tmp_path):
    # With one epoch and one minibatch the first forward of the update sees the rollout-time policy:
    # the ratio is exactly 1 (dropout off, log-probs at the sampling temperature) and nothing is clipped.
    cfg = ppo_cfg(tmp_path, max_steps=1, ppo_epochs=1, batch_size=8, temperature=0.7, kl_target=1.0,
                  kl_horizon=100, kl_coef=0.2)
    trainer = make_trainer(cfg, TokenSetReward(0))
    metrics = trainer.train_step()
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-8)
    # KL was 0 (identical models) so the adaptive controller lowered beta by the clipped error -0.2.
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 - 0.2 * 8 / 100))


def test_ppo_resume_equals_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, save_every=2, sample_every=2, num_samples=2)
    full = make_trainer(ppo_cfg(tmp_path / "a", **common), TokenSetReward(0))
    full.run()
    # Crash during step 3 (the reward model "dies"), after the step-2 checkpoint.
    crashed = make_trainer(ppo_cfg(tmp_path / "b", **common), TokenSetReward(0, fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    # A fresh process: same reference (it is reloaded from the SFT directory in real runs), while the
    # policy and value weights start scrambled - the checkpoint must restore them.
    resumed = make_trainer(ppo_cfg(tmp_path / "b", resume=True, **common), TokenSetReward(0))
    with torch.no_grad():
        for p in list(resumed.policy.parameters()) + list(resumed.value_model.parameters()):
            p.add_(torch.randn_like(p))
    result = resumed.run()
    assert result.resumed_from == 2
    for (name, a), b in zip(full.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full.value_model.parameters(), resumed.value_model.parameters()):
        assert torch.equal(a, b)

    def rows(path):
        skip = {"time", "rollout_s", "generate_s", "score_s", "update_s"}
        return [{k: v for k, v in json.loads(line).items() if k not in skip}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "a" / "ppo") == rows(tmp_path / "b" / "ppo")
    assert ((tmp_path / "a" / "ppo" / "samples.jsonl").read_text()
            == (tmp_path / "b" / "ppo" / "samples.jsonl").read_text())


def test_ppo_and_grpo_supply_steps_to_the_shared_run():
    """Resume, logging, samples, checkpoints and the final save live in chatsmith.train.run, once."""
    import inspect

    from chatsmith.train import grpo, ppo
    from chatsmith.train.run import Stage

    for module, cls in ((ppo, ppo.PPOTrainer), (grpo, grpo.GRPOTrainer)):
        assert issubclass(cls, Stage)
        source = inspect.getsource(module)
        for copy in ("MetricsLogger", "save_config", "truncate", "save_final_model", "Progress(", "checkpointer.",
                     "samples.jsonl\","):
            assert copy not in source, (module.__name__, copy)


def length_reward(messages, response, row):
    """A reward function for `--reward-model py:test_ppo:length_reward` (longer is better, up to 40 chars)."""
    return min(len(response), 40) / 40


def test_ppo_with_a_reward_function_starts_its_value_model_from_the_policy(sft_dir, tmp_path):
    """`--reward-model py:...` (or `world`) is no directory: the value model starts from the policy's backbone."""
    from transformers import AutoModelForCausalLM

    from chatsmith.train.ppo import PPOTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."}]}) + "\n"
                               for i in range(8)))
    cfg = ppo_cfg(tmp_path, policy=sft_dir, reward_model="py:test_ppo:length_reward", prompts=str(prompts),
                  max_steps=1, train_embeddings="special")
    trainer = PPOTrainer(cfg)
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    torch.testing.assert_close(trainer.value_model.model.layers[0].mlp.up_proj.weight,
                               policy.model.layers[0].mlp.up_proj.weight)
    assert trainer.run().step == 1


def test_value_model_from_a_reward_model_predicts_in_the_units_of_the_normalised_rewards(tmp_path):
    """PPO's rewards are the reward model's normalised scores (raw - mean) / std, so the value model copied
    from it starts in those units: its head reads raw / std at every token (a Llama head has no bias to take
    the mean off: a constant offset of mean / std remains), while the frozen reward model PPO scores with
    stays as trained."""
    from transformers import AutoModelForSequenceClassification

    from chatsmith.reward_model import token_scores
    from chatsmith.train.ppo import PPOTrainer
    from test_grpo import write_toy_dirs

    model_dir, rm_dir, prompts_file = write_toy_dirs(tmp_path)
    raw = AutoModelForSequenceClassification.from_pretrained(str(rm_dir))
    torch.nn.init.normal_(raw.score.weight, std=0.5)
    raw.config.chatsmith_reward_mean, raw.config.chatsmith_reward_std = 3.0, 4.0
    raw.save_pretrained(str(rm_dir))
    trainer = PPOTrainer(ppo_cfg(tmp_path, policy=str(model_dir), reward_model=str(rm_dir),
                                 prompts=str(prompts_file), max_steps=1, rollout_batch_size=4))
    ids = torch.tensor([[5, 17, 42, 99, 3, 8], [7, 7, 21, 64, 90, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        raw_scores = token_scores(raw, ids, mask)[:, :-1]          # the states each response token is chosen in
        values = value_forward(trainer.value_model, ids, mask, prompt_len=1)
        normalised = trainer.scorer.rm.normalize(token_scores(trainer.scorer.rm.model, ids, mask)[:, :-1])
    torch.testing.assert_close(values, raw_scores / 4.0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values - normalised, torch.full_like(values, 3.0 / 4.0), atol=1e-5, rtol=1e-4)
    assert float(raw_scores.std()) > 0.1     # the positions differ: not a constant head

    # a reward ensemble (`chatsmith reward --ensemble`): the value model starts from the first member, in its units
    import json
    import shutil

    from chatsmith.reward_model import ENSEMBLE_FILE, RewardEnsemble

    member = rm_dir / "members" / "member-1"
    shutil.copytree(rm_dir, member)
    other = AutoModelForSequenceClassification.from_pretrained(str(member))
    other.config.chatsmith_reward_mean, other.config.chatsmith_reward_std = -1.0, 0.5
    other.save_pretrained(str(member))
    (rm_dir / ENSEMBLE_FILE).write_text(json.dumps({"members": ["members/member-1"]}))
    trainer = PPOTrainer(ppo_cfg(tmp_path, policy=str(model_dir), reward_model=str(rm_dir),
                                 prompts=str(prompts_file), max_steps=1, rollout_batch_size=4,
                                 out=str(tmp_path / "ppo-ensemble")))
    assert isinstance(trainer.scorer.rm, RewardEnsemble)
    with torch.no_grad():
        values = value_forward(trainer.value_model, ids, mask, prompt_len=1)
    torch.testing.assert_close(values, raw_scores / 4.0, atol=1e-5, rtol=1e-4)
