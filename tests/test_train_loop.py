"""Tests for the shared training loop (chatsmith.train.run, supervised, optim, batching, checkpoint): schedule, optimizer groups, batch source, exact resume, atomic checkpoints,
NaN detection and the accumulated-batch loss normalisation.

Run: python -m pytest tests/test_train_loop.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from chatsmith.errors import ChatsmithError
from chatsmith.train.batching import ShardedBatchSource
from chatsmith.train.checkpoint import Checkpointer
from chatsmith.train.config import TrainConfig
from chatsmith.train.optim import build_optimizer, build_scheduler, lr_multiplier
from chatsmith.train.run import TrainingDiverged
from chatsmith.train.supervised import Trainer
from chatsmith.utils import read_metrics, set_seed

VOCAB = 64


def tiny_llama(seed: int = 0, dropout: float = 0.0, tie: bool = False, planted: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatsmith.planted import plant_induction_head, plant_previous_token_head

    set_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=dropout, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    if planted:                 # the induction init's frozen slices (kept by --freeze-planted)
        plant_previous_token_head(model)
        plant_induction_head(model)
    return model


def make_items(n: int = 24, seed: int = 1):
    """Variable-length token rows; the targets mask a random prefix (like a prompt) so counts differ."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 6 + (i * 7) % 11
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        targets = ids[1:].clone()
        targets[: i % 4] = -100
        items.append((ids[:-1], targets))
    return items


def collate(rows):
    t = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), t, dtype=torch.long)
    targets = torch.full((len(rows), t), -100, dtype=torch.long)
    for r, (ids, tg) in enumerate(rows):
        input_ids[r, : len(ids)] = ids
        targets[r, : len(tg)] = tg
    return {"input_ids": input_ids, "targets": targets}


def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100,
                               reduction="sum")
    return loss_sum, int((batch["targets"] != -100).sum()), {}


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / "run"), max_steps=6, lr=3e-3, warmup_steps=2, batch_size=4, log_every=1,
                save_every=0, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, loss_fn=lm_loss, items=None, dropout=0.1, planted=False, **kw):
    model = tiny_llama(cfg.seed, dropout=dropout, planted=planted)
    source = ShardedBatchSource(items or make_items(), cfg.batch_size, collate, seed=cfg.seed)
    return Trainer(cfg, model, None, source, loss_fn, stage="test", save_final=False, **kw), model


# ----------------------------------------------------------------------------- schedule and optimizer

def test_scheduler_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, max_steps=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(24):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    decay = lrs[4:20]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "cosine part must not increase"
    assert lrs[19] == pytest.approx(0.1) and lrs[23] == pytest.approx(0.1)
    assert lr_multiplier(12, 4, 21, 0.1) == pytest.approx(0.55)   # half-way through the cosine


def test_optimizer_skips_decay_on_norms_biases_and_embeddings():
    model = tiny_llama(tie=True)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.get_input_embeddings().weight) not in decay
    assert all(p.ndim >= 2 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert any("q_proj" in names[i] for i in decay)
    assert not any("norm" in names[i] for i in decay)
    untied = tiny_llama(tie=False)
    decay2 = {id(p) for g in build_optimizer(untied, TrainConfig()).param_groups
              if g["weight_decay"] > 0 for p in g["params"]}
    assert id(untied.get_input_embeddings().weight) not in decay2
    assert id(untied.get_output_embeddings().weight) not in decay2
    assert id(untied.model.layers[0].mlp.up_proj.weight) in decay2


# ----------------------------------------------------------------------------- batch source

def test_batch_source_is_deterministic_and_resumes_mid_epoch():
    items = list(range(10))
    a = ShardedBatchSource(items, 3, list, seed=5)
    seq = [a.next_batch() for _ in range(9)]          # 4 batches per epoch: crosses two epoch boundaries
    assert sorted(sum(seq[:4], [])) == items           # one epoch visits every item once
    assert seq[:4] != seq[4:8]                         # a new order per epoch
    b = ShardedBatchSource(items, 3, list, seed=5)
    for _ in range(5):
        b.next_batch()
    c = ShardedBatchSource(items, 3, list, seed=5)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch() for _ in range(4)] == seq[5:9]
    assert ShardedBatchSource(items, 3, list, seed=6).next_batch() != seq[0]
    with pytest.raises(ChatsmithError, match="n_items"):
        ShardedBatchSource(items[:9], 3, list, seed=5).load_state_dict(b.state_dict())


def test_batch_source_shards_by_rank_from_env(monkeypatch):
    items = list(range(11))
    shards = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "3")
        src = ShardedBatchSource(items, 2, list, seed=3)
        assert src.rank == r and src.world_size == 3
        shards.append(sum((src.next_batch() for _ in range(src.batches_per_epoch)), []))
    assert len({len(s) for s in shards}) == 1, "every rank must see the same number of items"
    assert set().union(*map(set, shards)) == set(items)
    assert sum(len(s) for s in shards) == 12           # padded by wrapping to a multiple of 3


# ----------------------------------------------------------------------------- resume, checkpoints, NaN

@pytest.mark.parametrize("planted", [False, True])
def test_resumed_run_matches_uninterrupted_run_exactly(tmp_path, planted):
    full, full_model = run(config(tmp_path / "a", save_every=3, freeze_planted=planted), planted=planted)
    full.run()
    expected = [r["loss"] for r in read_metrics(tmp_path / "a" / "run") if "loss" in r]
    assert len(expected) == 6

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:                               # inside step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    interrupted, _ = run(config(tmp_path / "b", save_every=3, freeze_planted=planted), loss_fn=crashing_loss,
                         planted=planted)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert Checkpointer(tmp_path / "b" / "run").step() == 3
    resumed, resumed_model = run(config(tmp_path / "b", save_every=3, resume=True, freeze_planted=planted),
                                 planted=planted)
    result = resumed.run()
    assert result.resumed_from == 3 and result.step == 6
    got = [r["loss"] for r in read_metrics(tmp_path / "b" / "run") if "loss" in r]
    assert got == expected                               # bit-identical (CPU), including the resumed steps
    for (name, p), q in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_checkpoint_write_failure_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_llama()
    opt = build_optimizer(model, TrainConfig())
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model, opt, data_state={"epoch": 0, "position": 1})
    before = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated Ctrl-C in the middle of writing state.pt")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, model, opt)
    monkeypatch.undo()
    assert ckpt.step() == 1
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"], "temp directories must be cleaned up"
    fresh = tiny_llama(seed=9)
    state = Checkpointer(tmp_path).load(fresh, build_optimizer(fresh, TrainConfig()))
    assert state["step"] == 1 and state["data"] == {"epoch": 0, "position": 1}
    assert torch.equal(fresh.model.norm.weight, torch.ones_like(fresh.model.norm.weight))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_at_step_3(model, batch):
        calls["n"] += 1
        loss, n, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), n, m

    trainer, _ = run(config(tmp_path, save_every=2), loss_fn=nan_at_step_3)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*step 2"):
        trainer.run()
    assert Checkpointer(tmp_path / "run").step() == 2


# ----------------------------------------------------------------------------- normalisation

def _captured_grads(trainer):
    grads = {}

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    trainer.train_step()
    return grads


@pytest.mark.filterwarnings("ignore:Seems like")
def test_accumulated_loss_is_normalised_by_all_targets_of_the_window(tmp_path):
    items = make_items(8)
    one, _ = run(config(tmp_path / "one", batch_size=8, grad_clip=0), items=items, dropout=0.0)
    one.source.shuffle = False
    accum, _ = run(config(tmp_path / "acc", batch_size=2, grad_accum=4, grad_clip=0), items=items, dropout=0.0)
    accum.source.shuffle = False
    g_one, g_acc = _captured_grads(one), _captured_grads(accum)
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-4, atol=1e-6)

    # The naive mean of per-micro-batch means gives a different gradient on this data (targets per
    # micro-batch differ), so the test above can tell the two apart.
    model = tiny_llama(dropout=0.0)
    for i in range(0, 8, 2):
        loss, n, _ = lm_loss(model, collate(items[i:i + 2]))
        (loss / n / 4).backward()
    naive = dict(model.named_parameters())["lm_head.weight"].grad
    assert not torch.allclose(naive, g_one["lm_head.weight"], rtol=1e-3, atol=1e-6)


def test_step_metrics_are_weighted_by_targets_or_by_their_own_counts(tmp_path):
    """A float metric is averaged over the window weighted by each micro-batch's targets; a (sum, count)
    metric is total sum / total count (e.g. an accuracy over pairs when the targets are examples)."""
    items = make_items(8)

    def loss_fn(model, batch):
        loss, n, _ = lm_loss(model, batch)
        rows = batch["input_ids"].shape[0]
        return loss, n, {"per_target": float(n), "targets_per_row": (float(n), rows)}

    trainer, _ = run(config(tmp_path, batch_size=2, grad_accum=4), loss_fn=loss_fn, items=items, dropout=0.0)
    trainer.source.shuffle = False
    counts = [int((collate(items[i:i + 2])["targets"] != -100).sum()) for i in range(0, 8, 2)]
    out = trainer.train_step()
    assert out["n_targets"] == sum(counts)
    assert out["per_target"] == pytest.approx(sum(c * c for c in counts) / sum(counts))
    assert out["targets_per_row"] == pytest.approx(sum(counts) / 8)
    assert out["targets_per_row"] != pytest.approx(sum(c * c / 2 for c in counts) / sum(counts))   # target-weighted


def test_batch_source_resumes_on_another_world_size_with_the_same_global_batch(monkeypatch):
    """Global batch k is the same rows whatever the split over ranks, so a checkpoint of 2 ranks x 3 rows
    resumes on 1 rank x 6 rows (and vice versa); a different global batch is refused by name."""
    items = list(range(30))
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = []
    for r in range(2):
        monkeypatch.setenv("RANK", str(r))
        ranks.append(ShardedBatchSource(items, 3, list, seed=4))
    global_batches = [sorted(ranks[0].next_batch() + ranks[1].next_batch()) for _ in range(3)]
    saved = ranks[0].state_dict()
    following = sorted(ranks[0].next_batch() + ranks[1].next_batch())
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    single = ShardedBatchSource(items, 6, list, seed=4)
    assert [sorted(single.next_batch()) for _ in range(3)] == global_batches
    resumed = ShardedBatchSource(items, 6, list, seed=4)
    resumed.load_state_dict(saved)
    assert sorted(resumed.next_batch()) == following
    with pytest.raises(ChatsmithError, match="global batch is 6 rows"):
        ShardedBatchSource(items, 4, list, seed=4).load_state_dict(saved)


@pytest.mark.filterwarnings("ignore:Seems like")
def test_activation_checkpointing_recomputes_layers_and_keeps_the_gradients(tmp_path, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    calls = {"mlp": 0}
    forward = llama.LlamaMLP.forward

    def counted(self, x):
        calls["mlp"] += 1
        return forward(self, x)

    monkeypatch.setattr(llama.LlamaMLP, "forward", counted)
    grads, runs = {}, {}
    for on in (False, True):
        trainer, _ = run(config(tmp_path / str(on), activation_checkpointing=on), dropout=0.0)
        calls["mlp"] = 0
        grads[on] = _captured_grads(trainer)
        runs[on] = calls["mlp"]
    assert (runs[False], runs[True]) == (2, 4)      # 2 layers: each forward once more during backward
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name])


def test_metrics_rows_and_config_written(tmp_path):
    trainer, _ = run(config(tmp_path, max_steps=3, log_every=1),
                     eval_fn=lambda m: {"loss": 1.5})
    trainer.run()
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert {"lr", "grad_norm", "tokens_per_s", "n_targets"} <= set(train_rows[0])
    assert any(r.get("eval_loss") == 1.5 for r in rows)
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["freeze_planted"] is False and saved["lr"] == 3e-3 and saved["report_to"] == "none"
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3



def test_resuming_a_finished_run_leaves_its_metrics_as_they_are(tmp_path):
    """Running the same command with --resume after the run ended (a retry after a crash at exit) trains
    nothing and adds no second final-evaluation row."""
    trainer, _ = run(config(tmp_path, max_steps=3), eval_fn=lambda m: {"loss": 1.5})
    trainer.run()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 3]
    again, _ = run(config(tmp_path, max_steps=3, resume=True), eval_fn=lambda m: {"loss": 1.5})
    result = again.run()
    assert result.resumed_from == 3 and result.step == 3 and result.eval == {"eval_loss": 1.5}
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before

# ----------------------------------------------------------------------------- TensorBoard, setting names

def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _ = run(config(tmp_path, max_steps=3, log_every=1, report_to="tensorboard"),
                     eval_fn=lambda m: {"loss": 1.5})
    trainer.run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r]
    board = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in board] == [1, 2, 3]
    assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(1.5)
    assert "train/grad_norm" in events.Tags()["scalars"]


def test_report_to_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    with pytest.raises(ChatsmithError, match="pip install tensorboard"):
        run(config(tmp_path, report_to="tensorboard"))


def test_transformers_setting_names_are_aliases_of_the_fields(tmp_path):
    from chatsmith.cli import COMMANDS, build_parser
    from chatsmith.config import parse_config
    from chatsmith.train.ppo import PPOConfig
    from chatsmith.train.sft import SFTConfig

    cfg = parse_config(SFTConfig, ["--learning-rate", "3e-4", "--per-device-train-batch-size", "2",
                                   "--gradient-accumulation-steps", "3", "--max-grad-norm", "0.5",
                                   "--logging-steps", "5", "--save-steps", "7", "--eval-steps", "9",
                                   "--num-train-epochs", "2", "--output-dir", "x"])
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.grad_clip) == (3e-4, 2, 3, 0.5)
    assert (cfg.log_every, cfg.save_every, cfg.eval_every, cfg.epochs, cfg.out) == (5, 7, 9, 2.0, "x")
    settings = tmp_path / "sft.yaml"
    settings.write_text("learning_rate: 3.0e-4\nper_device_train_batch_size: 4\n")
    from_yaml = parse_config(SFTConfig, ["--config", str(settings)])
    assert (from_yaml.lr, from_yaml.batch_size) == (3e-4, 4)
    assert parse_config(SFTConfig, ["--config", str(settings), "--lr", "1e-3"]).lr == 1e-3   # flags win
    settings.write_text("learning_rate: 3.0e-4\nlr: 1.0e-3\n")
    with pytest.raises(ChatsmithError, match="same setting"):
        parse_config(SFTConfig, ["--config", str(settings)])
    with pytest.raises(SystemExit):                       # ppo has no epochs: no --num-train-epochs either
        parse_config(PPOConfig, ["--num-train-epochs", "2"])
    help_text = build_parser(next(c for c in COMMANDS if c.name == "sft"))[0].format_help()
    assert "--lr X, --learning-rate X" in help_text
