"""LoRA (peft) on every fine-tuning stage, at toy size: SFT, reward and DPO lower their losses while only the
adapters (and the reward head) change; adapter directories load wherever a model directory does and merge
into plain models with the same logits; the reference of DPO/PPO/GRPO is the base with the adapters off;
PPO (its value model sharing the reward model's weights) and GRPO run and resume.
Run: `python -m pytest tests/test_lora.py -q`."""

from __future__ import annotations

import json

import pytest
import torch

from test_ppo import TokenSetReward, one_thread, toy_models, toy_prompts  # noqa: F401
from conftest import tiny_llama_config, write_jsonl
from test_reward import toy_preferences

LORA = dict(lora_r=4, lora_alpha=8.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """The module's runs (fixtures included) single-threaded, as test_ppo's: threads only contend here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def capture_trainer(monkeypatch, module) -> dict:
    """Keep the model a stage hands to its Trainer (to look at its weights after the run)."""
    captured: dict = {}
    original = module.Trainer

    class Capturing(original):
        def __init__(self, cfg, model, *args, **kwargs):
            captured["model"] = model
            super().__init__(cfg, model, *args, **kwargs)

    monkeypatch.setattr(module, "Trainer", Capturing)
    return captured


def assert_only_adapters_changed(model, base, heads=()) -> None:
    """Every base weight of ``model`` equals the base's (a model directory or a state dict); the adapters'
    B matrices moved off zero."""
    from safetensors.torch import load_file

    if not isinstance(base, dict):
        base = load_file(str(base / "model.safetensors"))
    lora_b = 0
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            lora_b += 1
            assert param.abs().sum() > 0, name
            continue
        if ".lora_A." in name or any(h in name for h in heads):
            continue
        plain = name.replace(".base_layer", "").replace(".original_module", "")
        assert plain in base, plain
        assert not param.requires_grad, name
        torch.testing.assert_close(param.detach().cpu(), base[plain], rtol=0, atol=0, msg=name)
    assert lora_b > 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny chatml Llama base directory and the data files of every stage."""
    import transformers

    from chatsmith.chat.templates import BUILTIN_TEMPLATES
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("lora")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    prefs = toy_preferences(24)
    sft_rows = [{"messages": r["prompt"] + [{"role": "assistant", "content": r.get("chosen") or r["ranked"][0]}]}
                for r in prefs]
    return {"root": root, "base": root / "base", "sft": write_jsonl(root / "sft.jsonl", sft_rows),
            "prefs": write_jsonl(root / "prefs.jsonl", prefs),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"messages": r["prompt"]} for r in prefs[:8]])}


@pytest.fixture(scope="module")
def sft_run(files, tmp_path_factory):
    """LoRA SFT of the base (the model the Trainer held is kept for the checks)."""
    from chatsmith.train import sft as sft_module

    mp = pytest.MonkeyPatch()
    captured = capture_trainer(mp, sft_module)
    out = files["root"] / "sft"
    try:
        sft_module.sft(sft_module.SFTConfig(model=str(files["base"]), data=files["sft"], out=str(out), max_steps=12,
                                            lr=1e-2, warmup_steps=0, batch_size=8, eval_fraction=0.0,
                                            save_every=0, log_every=1, progress=False, device="cpu", **LORA))
    finally:
        mp.undo()
    return out, captured["model"]


def test_lora_sft_lowers_the_loss_trains_only_adapters_and_saves_an_adapter_dir(sft_run, files):
    out, model = sft_run
    curve = losses(out)
    assert curve[-1] < curve[0] - 0.1, curve
    assert_only_adapters_changed(model, files["base"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(files["base"].resolve())
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert (out / "tokenizer_config.json").is_file()
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(str(out / "checkpoint" / "model.safetensors")))


def test_merged_model_has_the_adapter_models_logits_and_generate_takes_an_adapter(sft_run, files, capsys):
    import transformers

    from chatsmith.generate.cli import GenerateConfig, generate_cli
    from chatsmith.model import load_model
    from chatsmith.train.lora import MergeConfig, merge

    out, model = sft_run
    merged_dir = merge(MergeConfig(adapter=str(out), out=str(files["root"] / "merged")))
    assert not (merged_dir / "adapter_config.json").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        loaded = load_model(out, device="cpu")          # the loader every command uses
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert loaded.tokenizer.chat_template == plain_template(merged_dir)
    texts = []
    for path in (out, merged_dir):
        generate_cli(GenerateConfig(model=str(path), prompt="The capital of", max_new_tokens=6, temperature=0.0,
                                    device="cpu"))
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    stop = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert plain.generation_config.eos_token_id == stop == loaded.model.generation_config.eos_token_id


def test_adapter_base_paths_relative_to_the_adapter_and_a_missing_base(sft_run, files):
    import shutil

    from chatsmith.errors import ChatsmithError
    from chatsmith.model import load_model

    out, model = sft_run
    copy = files["root"] / "moved" / "adapter"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint", "*.jsonl"))
    config = json.loads((copy / "adapter_config.json").read_text())
    ids = torch.tensor([[5, 17, 42, 99]])
    for base, ok in (("../../base", True), ("../../nowhere", False)):
        (copy / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=base)))
        if ok:
            with torch.no_grad():
                torch.testing.assert_close(load_model(copy, device="cpu").model(ids).logits, model.eval()(ids).logits,
                                           atol=1e-5, rtol=1e-5)
        else:
            with pytest.raises(ChatsmithError, match="base_model_name_or_path"):
                load_model(copy, device="cpu")


def test_a_final_save_removes_the_other_model_kind(tmp_path):
    from chatsmith.train.checkpoint import save_final_model
    from chatsmith.train.lora import apply_lora
    from chatsmith.train.sft import SFTConfig

    policy, _, _, tokenizer, _ = toy_models(0)
    save_final_model(policy, tokenizer, tmp_path, None)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    save_final_model(apply_lora(toy_models(0)[0], SFTConfig(lora_r=2)), tokenizer, tmp_path, None)
    assert (tmp_path / "adapter_config.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "config.json").exists() and (tmp_path / "tokenizer_config.json").is_file()
    save_final_model(policy, tokenizer, tmp_path, None)
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "model.safetensors").is_file()


def plain_template(path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).chat_template


@pytest.fixture(scope="module")
def reward_run(files, sft_run):
    """LoRA reward model on the LoRA SFT model (an adapter directory as --model)."""
    from chatsmith.train import reward as reward_module
    from chatsmith.train import supervised

    mp = pytest.MonkeyPatch()
    captured = capture_trainer(mp, supervised)     # train_reward_model imports the Trainer when it runs
    out = files["root"] / "rm"
    try:
        reward_module.train_reward_model(reward_module.RewardConfig(
            model=str(sft_run[0]), data=files["prefs"], out=str(out), max_steps=12, lr=1e-2, warmup_steps=0,
            batch_size=8, eval_fraction=0.0, norm_source="preferences", log_every=1, save_every=0, progress=False,
            device="cpu", **LORA))
    finally:
        mp.undo()
    return out, captured["model"]


def test_lora_reward_model_trains_adapters_and_head_and_scores_like_its_merge(reward_run, files):
    from chatsmith.reward_model import check_reward_model_dir, load_reward_model
    from chatsmith.train.lora import MergeConfig, merge

    out, model = reward_run
    curve = losses(out)
    assert curve[-1] < curve[0] - 0.05, curve
    from chatsmith.model import load_model

    sft = load_model(files["root"] / "sft", device="cpu").model.state_dict()   # the base: SFT merged
    assert_only_adapters_changed(model, sft, heads=("score.",))
    head = model.score.modules_to_save["default"].weight
    assert not torch.equal(head, model.score.original_module.weight)   # the head trained
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    check_reward_model_dir(out)
    rm = load_reward_model(out, device="cpu")
    merged = merge(MergeConfig(adapter=str(out), out=str(files["root"] / "rm-merged")))
    check_reward_model_dir(merged)
    plain = load_reward_model(merged, device="cpu")
    assert (rm.mean, rm.std) == (plain.mean, plain.std)
    seqs = [[5, 17, 42, 99, 3], [250, 7, 8]]
    torch.testing.assert_close(rm.score_token_ids(seqs), plain.score_token_ids(seqs), atol=1e-5, rtol=1e-5)
    model.eval()
    from chatsmith.reward_model import sequence_rewards

    ids = torch.tensor([seqs[0]])
    with torch.no_grad():
        torch.testing.assert_close(rm.score_token_ids(seqs[:1], normalize=False),
                                   sequence_rewards(model, ids, torch.ones_like(ids)).cpu(), atol=1e-5, rtol=1e-5)


def test_lora_dpo_lowers_the_loss_and_its_reference_is_the_base_with_adapters_off(files, monkeypatch):
    import transformers

    from chatsmith.train import supervised
    from chatsmith.train.dpo import DPOConfig, dpo
    from chatsmith.train.lora import adapter_disabled

    captured = capture_trainer(monkeypatch, supervised)     # dpo imports the Trainer when it runs
    out = files["root"] / "dpo"
    dpo(DPOConfig(model=str(files["base"]), data=files["prefs"], out=str(out), max_steps=10, lr=1e-2,
                  warmup_steps=0, batch_size=8, eval_fraction=0.0, log_every=1, save_every=0, progress=False,
                  device="cpu", **LORA))
    curve = losses(out)
    assert curve[-1] < curve[0] - 0.05, curve
    model = captured["model"].eval()
    assert_only_adapters_changed(model, files["base"])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(files["base"])).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        trained = model(ids).logits
        with adapter_disabled(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)
    assert (trained - base(ids).logits).abs().max() > 1e-3


def test_lora_ppo_from_adapter_dirs_shares_the_reward_weights_with_the_value_model(sft_run, reward_run, files):
    from chatsmith.train.lora import AdapterDisabledScorer, DisabledAdapterView
    from chatsmith.train.ppo import PPOConfig, PPOTrainer

    out = files["root"] / "ppo"
    trainer = PPOTrainer(PPOConfig(policy=str(sft_run[0]), reward_model=str(reward_run[0]), prompts=files["prompts"],
                                   out=str(out), max_steps=2, rollout_batch_size=4, batch_size=4, ppo_epochs=1,
                                   lr=1e-2, max_new_tokens=6, max_len=128, sample_every=0, save_every=0,
                                   progress=False, device="cpu", **LORA))
    assert isinstance(trainer.reference, DisabledAdapterView)
    assert isinstance(trainer.scorer, AdapterDisabledScorer)
    assert trainer.scorer.rm.model is trainer.value_model          # one copy serves reward and value
    seqs = [[5, 17, 42, 99, 3]]
    with torch.no_grad():
        before = trainer.scorer(*_rollout_like(seqs))[:1]
    from chatsmith.reward_model import load_reward_model

    # The reward is the reward model as trained (its value-model copy of the head starts rescaled, see ppo.py).
    torch.testing.assert_close(before, load_reward_model(reward_run[0], device="cpu").score_token_ids(seqs),
                               atol=1e-6, rtol=1e-6)
    trainer.run()
    with torch.no_grad():
        torch.testing.assert_close(trainer.scorer(*_rollout_like(seqs))[:1], before, atol=1e-6, rtol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert json.loads((out / "value" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    from chatsmith.model import load_model

    load_model(out, device="cpu")                      # a chain: PPO adapter on the SFT adapter on the base


def _rollout_like(seqs):
    """A minimal rollout of finished rows for a RewardModelScorer (same vocabulary: ids read directly)."""
    from types import SimpleNamespace

    ids = torch.tensor(seqs)
    return (SimpleNamespace(batch_size=len(seqs), input_ids=ids, attention_mask=torch.ones_like(ids),
                            finished=torch.ones(len(seqs), dtype=torch.bool)), None)


def grpo_trainer(tmp_path, **kw):
    from chatsmith.train.grpo import GRPOConfig, GRPOTrainer

    policy, _, _, tokenizer, fmt = toy_models(0)
    cfg = GRPOConfig(**{**dict(out=str(tmp_path / "grpo"), max_steps=2, prompts_per_step=2, num_generations=2,
                               batch_size=4, lr=3e-2, max_new_tokens=6, temperature=1.0, beta=0.04,
                               sample_every=0, save_every=1, progress=False, device="cpu"), **LORA, **kw})
    return GRPOTrainer(cfg, policy=policy, tokenizer=tokenizer, fmt=fmt, scorer=TokenSetReward(0),
                       prompts=toy_prompts(tokenizer, fmt)[:4])


def test_lora_grpo_runs_and_resumes_exactly(tmp_path):
    from chatsmith.train.lora import DisabledAdapterView

    full = grpo_trainer(tmp_path / "a")
    assert isinstance(full.reference, DisabledAdapterView)
    base = {n: p.detach().clone() for n, p in full.policy.named_parameters() if "lora_" not in n}
    full.run()
    for name, param in full.policy.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name
    grpo_trainer(tmp_path / "b", max_steps=1).run()
    resumed = grpo_trainer(tmp_path / "b", resume=True)
    resumed.run()
    a, b = (dict(full.policy.named_parameters()), dict(resumed.policy.named_parameters()))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lora_grpo_reference_log_probs_are_the_base_models(tmp_path):
    """The LoRA reference (the policy with its adapters off) scores responses as the base model does, not as
    the trained policy: its forward is not short-cut to the policy's backbone (`response_logprobs`)."""
    from chatsmith.train.rollout import collect_rollout, response_forward

    trainer = grpo_trainer(tmp_path, save_every=0)
    trainer.run()
    base = toy_models(0)[0]
    ro = collect_rollout(trainer.policy, None, trainer.tokenizer, [p.ids for p in trainer.prompts[:2]], [0, 1],
                         max_new_tokens=6, temperature=1.0, stop_token_ids=trainer.stop_token_ids, seed=4)
    m = ro.response_mask

    def logprobs(model):
        with torch.no_grad():
            return response_forward(model, ro.input_ids, ro.attention_mask, ro.prompt_len)[0] * m

    reference = logprobs(trainer.reference)
    torch.testing.assert_close(reference, logprobs(base), atol=1e-5, rtol=1e-5)
    assert (reference - logprobs(trainer.policy)).abs().max() > 1e-3


def test_full_ppo_from_a_lora_sft_model_trains_every_weight(sft_run, reward_run, files, tmp_path):
    """A LoRA SFT adapter dir as the policy of a full (no LoRA) fine-tune: the merged model is trainable."""
    from chatsmith.model import load_model
    from chatsmith.train.ppo import PPOConfig, PPOTrainer

    loaded = load_model(sft_run[0], device="cpu")
    assert all(p.requires_grad for p in loaded.model.parameters())
    trainer = PPOTrainer(PPOConfig(policy=str(sft_run[0]), reward_model=str(reward_run[0]), prompts=files["prompts"],
                                   out=str(tmp_path / "ppo"), max_steps=1, rollout_batch_size=4, batch_size=4,
                                   ppo_epochs=1, lr=1e-2, max_new_tokens=6, max_len=128, sample_every=0,
                                   save_every=0, progress=False, device="cpu"))
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.run()
    changed = [n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])]
    assert any("mlp" in n for n in changed) and any("self_attn" in n for n in changed)


def test_lora_ppo_with_a_toy_reward_runs_two_steps(tmp_path):
    from test_ppo import ppo_cfg

    from chatsmith.train.ppo import PPOTrainer

    policy, _, value, tokenizer, fmt = toy_models(0)
    trainer = PPOTrainer(ppo_cfg(tmp_path, max_steps=2, rollout_batch_size=4, ppo_epochs=1, **LORA), policy=policy,
                         tokenizer=tokenizer, fmt=fmt, value_model=value, scorer=TokenSetReward(0),
                         prompts=toy_prompts(tokenizer, fmt)[:4])
    result = trainer.run()
    assert result.step == 2
    assert sum(p.numel() for p in trainer.value_model.parameters() if p.requires_grad) < \
        sum(p.numel() for p in trainer.value_model.parameters()) / 2


def test_lora_settings_are_checked(tmp_path, capsys):
    from chatsmith.cli import main
    from chatsmith.config import parse_config
    from chatsmith.errors import ChatsmithError
    from chatsmith.train.lora import apply_lora, parameter_counts
    from chatsmith.train.sft import SFTConfig

    with pytest.raises(ChatsmithError, match="--lora-r"):
        parse_config(SFTConfig, ["--lora-r", "-1"])
    with pytest.raises(ChatsmithError, match="--lora-targets"):
        parse_config(SFTConfig, ["--lora-r", "4", "--lora-targets", "q_proj;v"])
    policy, _, _, _, _ = toy_models(0)
    total = sum(p.numel() for p in policy.parameters())
    with pytest.raises(ChatsmithError, match=r"--lora-targets nope_proj: .*q_proj"):
        apply_lora(policy, SFTConfig(lora_r=4, lora_targets="nope_proj"))
    model = apply_lora(toy_models(0)[0], SFTConfig(lora_r=4, lora_targets="q_proj,v_proj"))
    all_params, trainable = parameter_counts(model)
    assert all_params > total and 0 < trainable == all_params - total
    assert main(["pretrain", "--lora-r", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--lora-r" in capsys.readouterr().err
    for command in ("sft", "merge"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--lora-targets" in capsys.readouterr().out


def test_lora_rlhf_two_rounds_train_adapters_and_the_final_policy_loads(tmp_path):
    from test_rlhf import rlhf_cfg

    from chatsmith.model import load_model
    from chatsmith.reward_model import load_reward_model
    from chatsmith.train.rlhf import rlhf

    results = rlhf(rlhf_cfg(tmp_path, lora_r=2))
    assert [r.round for r in results] == [1, 2]
    for r in results:
        assert json.loads((tmp_path / "rlhf" / f"round_{r.round}" / "rm" / "adapter_config.json").read_text()
                          )["task_type"] == "SEQ_CLS"
        load_reward_model(r.reward_model, device="cpu")
    out = tmp_path / "rlhf"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("round_1/ppo")
    assert load_model(out, device="cpu").fmt is not None
