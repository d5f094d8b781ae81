"""GRPO at toy size: a toy reward goes up, the world's judge works as a verifiable reward, resume is exact,
and the command runs from files. Run: `python -m pytest tests/test_grpo.py -q`."""

from __future__ import annotations

import json

import pytest
import torch

from test_ppo import TokenSetReward, mean_toy_reward, one_thread, toy_models, toy_prompts  # noqa: F401


def grpo_cfg(tmp_path, **kw):
    from chatsmith.train.grpo import GRPOConfig

    base = dict(out=str(tmp_path / "grpo"), max_steps=8, prompts_per_step=4, num_generations=4, batch_size=8,
                lr=3e-2, max_new_tokens=8, temperature=1.0, beta=0.04, sample_every=0, save_every=0,
                progress=False, device="cpu",
                train_embeddings="all")   # the toy policy is random: its embeddings are part of what it learns
    base.update(kw)
    return GRPOConfig(**base)


def make_trainer(cfg, scorer, seed: int = 0, prompts=None):
    from chatsmith.train.grpo import GRPOTrainer

    policy, reference, _, tokenizer, fmt = toy_models(seed)
    return GRPOTrainer(cfg, policy=policy, tokenizer=tokenizer, fmt=fmt, reference=reference, scorer=scorer,
                       prompts=prompts or toy_prompts(tokenizer, fmt))


def test_grpo_raises_a_toy_reward(tmp_path):
    reward = TokenSetReward(0)
    trainer = make_trainer(grpo_cfg(tmp_path, num_iterations=2), reward)
    before = mean_toy_reward(trainer.policy, trainer.tokenizer, trainer.prompts, reward, trainer.stop_token_ids)
    trainer.run()
    after = mean_toy_reward(trainer.policy, trainer.tokenizer, trainer.prompts, reward, trainer.stop_token_ids)
    assert after > before + 0.08, (before, after)
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for key in ("reward", "kl", "clip_fraction", "entropy", "response_length", "episodes_per_s", "rollout_s"):
        assert key in rows[-1], key
    assert rows[-1]["kl"] > 0


def test_grpo_samples_from_the_weights_its_fused_optimizer_wrote(tmp_path):
    """GRPO's fused AdamW writes the weights without bumping their version counters; the optimizer bumps
    them, so the sampling engine's weight copies are rebuilt: the next rollout samples from the new weights
    (what a fresh copy of the policy samples), not from the old ones."""
    import copy

    from chatsmith.train.rollout import collect_rollout

    trainer = make_trainer(grpo_cfg(tmp_path, max_steps=1), TokenSetReward(0))
    assert trainer.optimizer.param_groups[0]["fused"]
    prompts = [p.ids for p in trainer.prompts]

    def sample(model):
        ro = collect_rollout(model, None, trainer.tokenizer, prompts, list(range(len(prompts))), max_new_tokens=8,
                             temperature=1.0, stop_token_ids=trainer.stop_token_ids, seed=5,
                             need_policy_logprobs=False)
        return ro.response_ids.tolist()

    before = sample(trainer.policy)
    versions = [p._version for p in trainer.policy.parameters()]
    trainer.train_step()
    assert all(p._version > v for p, v in zip(trainer.policy.parameters(), versions))
    after = sample(trainer.policy)
    assert after == sample(copy.deepcopy(trainer.policy)) and after != before


def test_grpo_with_several_iterations_clips(tmp_path):
    trainer = make_trainer(grpo_cfg(tmp_path, max_steps=1, num_iterations=3, lr=5e-2), TokenSetReward(0))
    metrics = trainer.train_step()
    assert metrics["clip_fraction"] > 0           # later iterations are off-policy and get clipped


def test_grpo_world_reward_uses_the_judge(tmp_path):
    from chatsmith.chat.render import render_prompt
    from chatsmith.world import World
    from chatsmith.train.rollout import FunctionScorer, PromptItem
    from chatsmith.world.judge import prompt_item, reward

    _, _, _, tokenizer, fmt = toy_models()
    rows = World(seed=0).prompts()[:4]
    prompts = [PromptItem(r["messages"], f"world:{i}", {k: v for k, v in r.items() if k != "messages"},
                          render_prompt(r["messages"], tokenizer, fmt)) for i, r in enumerate(rows)]
    scorer = FunctionScorer(reward, "world")
    trainer = make_trainer(grpo_cfg(tmp_path, max_steps=1, prompts_per_step=2, num_generations=2), scorer,
                           prompts=prompts)
    result = trainer.run()
    assert result.metrics["clip_fraction"] == 0.0   # one update per batch: ratio exactly 1, nothing clipped
    rollout, rewards = trainer.last_samples
    from chatsmith.world.judge import score

    for i in range(rollout.batch_size):
        p = prompts[rollout.prompt_index[i]]
        item = prompt_item(p.messages, p.meta, p.origin)
        assert rewards[i].item() == pytest.approx(score(item, rollout.texts[i], finished=bool(rollout.finished[i])))
    bad = [PromptItem([{"role": "user", "content": "hi"}], "p.jsonl:3", {}, [1, 2])]
    with pytest.raises(Exception, match="p.jsonl:3.*category"):
        scorer.score_one(bad[0], "Paris.")


def test_grpo_resume_equals_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, save_every=2, lr=1e-2)
    full = make_trainer(grpo_cfg(tmp_path / "a", **common), TokenSetReward(0))
    full.run()
    crashed = make_trainer(grpo_cfg(tmp_path / "b", **common), TokenSetReward(0, fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    resumed = make_trainer(grpo_cfg(tmp_path / "b", resume=True, **common), TokenSetReward(0))
    with torch.no_grad():
        for p in resumed.policy.parameters():
            p.add_(torch.randn_like(p))
    assert resumed.run().resumed_from == 2
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    skip = {"time", "rollout_s", "generate_s", "score_s", "update_s", "episodes_per_s"}
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k not in skip}  # noqa: E731
                      for x in (d / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_grpo_command_from_files(tmp_path):
    """`chatsmith grpo --model DIR --prompts FILE --reward rm:DIR` end to end through the CLI."""
    from chatsmith.cli import main

    model_dir, rm_dir, prompts_file = write_toy_dirs(tmp_path)
    out = tmp_path / "grpo_cli"
    code = main(["grpo", "--model", str(model_dir), "--prompts", str(prompts_file), "--reward", f"rm:{rm_dir}",
                 "--out", str(out), "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
                 "--max-new-tokens", "6", "--device", "cpu", "--no-progress", "--sample-every", "1"])
    assert code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert (out / "checkpoint" / "state.pt").is_file()
    # A user error is one clear line, no traceback.
    assert main(["grpo", "--model", str(model_dir), "--prompts", str(tmp_path / "missing.jsonl"),
                 "--reward", f"rm:{rm_dir}", "--out", str(out), "--device", "cpu"]) == 2


def write_toy_dirs(tmp_path):
    """A toy policy directory, a toy reward-model directory and a prompts file, as the commands read them."""
    policy, _, value, tokenizer, fmt = toy_models()
    model_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
    policy.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    value.config.chatsmith_reward_mean = 0.0
    value.config.chatsmith_reward_std = 1.0
    value.save_pretrained(str(rm_dir))
    tokenizer.save_pretrained(str(rm_dir))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u}]}) + "\n"
                                    for u in ["What is the capital of France?", "Python", "Hello", "Is Java an island?"]))
    return model_dir, rm_dir, prompts_file


@pytest.mark.parametrize("fused", [True, False])
def test_shared_prompt_forward_equals_the_whole_sequences_and_its_gradient(fused, monkeypatch):
    """A group's prompt computed once (KV cache copied to its G responses) gives the log-probs and the
    gradient of running every whole sequence, under left padding and ragged responses; on the fused
    LM-head path (`response_logprobs.fused_response_forward`) and on the model's own forward."""
    from chatsmith.train import response_logprobs
    from chatsmith.train.rollout import collect_rollout, response_forward, rollout_micro_batches

    if not fused:
        monkeypatch.setattr(response_logprobs, "head_parts", lambda model: None)
    policy, _, _, tokenizer, fmt = toy_models()
    prompts = toy_prompts(tokenizer, fmt)[:3]
    index = [i for i in range(3) for _ in range(4)]
    stop = fmt.stop_token_ids(tokenizer)

    def ragged(model, tok, prompt_ids, max_new_tokens, temperature, stop_ids, seed):   # row i: i % 5 + 2 tokens
        return [[40 + (7 * i + j) % 50 for j in range(i % 5 + 1)] + [stop[0]] for i in range(len(prompt_ids))]

    ro = collect_rollout(policy, None, tokenizer, [prompts[i].ids for i in index], index, max_new_tokens=9,
                         temperature=1.0, stop_token_ids=stop, seed=2, generate_fn=ragged)
    assert ro.attention_mask[:, 0].eq(0).any() and ro.response_lengths.unique().numel() > 1
    m = ro.response_mask

    def run(share):
        policy.zero_grad()
        lp, ent = response_forward(policy, ro.input_ids, ro.attention_mask, ro.prompt_len, 0.8, True,
                                   share_prompt=share)
        ((lp * m).sum() + (ent * m).sum()).backward()
        return lp * m, ent * m, [p.grad.clone() for p in policy.parameters()]

    calls = []
    handle = policy.model.layers[0].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[:2]))
    whole, shared = run(False), run(True)
    handle.remove()
    p, t = ro.prompt_len, ro.input_ids.shape[1]
    if fused:   # the backbone only: positions [0, t - 1); then each prompt but its last token, and the rest
        assert calls == [(12, t - 1), (3, p - 1), (12, t - p)]
    else:       # the model: 12 whole rows; then each prompt, and the responses but their last token
        assert calls == [(12, t), (3, p), (12, t - p - 1)]
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], whole[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(shared[2], whole[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # Micro-batches keep a group together (rows of one prompt are never split while they fit).
    for rows in rollout_micro_batches(ro, range(12), 8):
        assert all(index.count(index[r]) == sum(index[q] == index[r] for q in rows) for r in rows)


def test_fused_head_equals_the_models_forward_with_trainable_rows(monkeypatch):
    """The fused LM head (log-softmax, gather, entropy in one node; the head's weight gradient only for the
    rows `restrict_embedding_training` lets train) gives the model's own log-probs, entropy and gradients,
    and the tied embedding's other rows get no gradient."""
    from chatsmith.model import restrict_embedding_training, special_token_ids
    from chatsmith.train import response_logprobs
    from chatsmith.train.rollout import collect_rollout, response_forward

    policy, _, _, tokenizer, fmt = toy_models()
    restrict_embedding_training(policy, tokenizer, fmt, "special")
    assert response_logprobs.head_parts(policy) is not None
    rows = response_logprobs.trainable_rows(policy.lm_head)
    special = sorted(set(special_token_ids(tokenizer, fmt)))
    assert rows.tolist() == special
    prompts = toy_prompts(tokenizer, fmt)[:2]
    index = [0, 0, 1, 1]
    ro = collect_rollout(policy, None, tokenizer, [prompts[i].ids for i in index], index, max_new_tokens=6,
                         temperature=1.0, stop_token_ids=fmt.stop_token_ids(tokenizer), seed=3)
    m = ro.response_mask

    def run():
        policy.zero_grad()
        lp, ent = response_forward(policy, ro.input_ids, ro.attention_mask, ro.prompt_len, 0.7, True)
        (lp * m * torch.linspace(-1, 2, m.numel()).view_as(m)).sum().backward()
        return lp * m, ent * m, {n: q.grad.clone() for n, q in policy.named_parameters()}

    fused = run()
    monkeypatch.setattr(response_logprobs, "head_parts", lambda model: None)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], atol=1e-5, rtol=1e-5)
    for name, grad in plain[2].items():
        torch.testing.assert_close(fused[2][name], grad, atol=1e-6, rtol=1e-4)
    embedding = fused[2]["model.embed_tokens.weight"]
    others = torch.ones(embedding.shape[0], dtype=torch.bool)
    others[special] = False
    assert embedding[others].abs().max() == 0 and embedding[special].abs().max() > 0


def test_every_step_draws_a_whole_batch_of_prompts(tmp_path):
    """8 prompts, 3 per step: the epoch's remainder of 2 is dropped, so no step (and, under torchrun, no rank)
    gets a short batch; the next epoch starts in a new order."""
    trainer = make_trainer(grpo_cfg(tmp_path, prompts_per_step=3), TokenSetReward(0))
    assert len(trainer.prompts) == 8
    batches = [trainer.source.next_batch() for _ in range(5)]
    assert [len(b) for b in batches] == [3] * 5 and len(set(batches[0] + batches[1])) == 6


USER_REWARD = '''
def length_reward(messages, response, row, finished):
    """A user's reward: half a point per character, 100 more for ending the turn."""
    return 0.5 * len(response) + (100.0 if finished else 0.0)


def constant(messages, response, row):
    return 1.25
'''


def test_grpo_with_a_users_reward_function(tmp_path, monkeypatch):
    """`--reward py:module:function`: the reward of every response is what the user's function returns."""
    from chatsmith.train.rollout import make_scorer

    (tmp_path / "user_reward_grpo.py").write_text(USER_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, _, _, tokenizer, _ = toy_models()
    scorer = make_scorer("py:user_reward_grpo:length_reward", tokenizer, "cpu")
    trainer = make_trainer(grpo_cfg(tmp_path, max_steps=2, prompts_per_step=2, num_generations=2), scorer)
    trainer.run()
    rollout, rewards = trainer.last_samples
    expected = [0.5 * len(t) + (100.0 if f else 0.0) for t, f in zip(rollout.texts, rollout.finished.tolist())]
    assert rewards.tolist() == pytest.approx(expected)
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["reward"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_grpo_command_with_a_users_reward_and_bad_specs(tmp_path, monkeypatch, capsys):
    from chatsmith.cli import main

    (tmp_path / "user_reward_grpo_cli.py").write_text(USER_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    model_dir, _, prompts_file = write_toy_dirs(tmp_path)
    out = tmp_path / "grpo_user"
    common = ["--model", str(model_dir), "--prompts", str(prompts_file), "--max-steps", "2",
              "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "4", "--device", "cpu",
              "--no-progress"]
    assert main(["grpo", *common, "--reward", "py:user_reward_grpo_cli:constant", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.25, 1.25] and all(r["reward_std"] == 0.0 for r in rows)
    capsys.readouterr()
    assert main(["grpo", *common, "--reward", "py:no_such_reward_module:f", "--out", str(tmp_path / "x")]) == 2
    assert "--reward py:no_such_reward_module:f: no module named 'no_such_reward_module'" in capsys.readouterr().err
