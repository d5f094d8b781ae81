"""Tests for chatsmith.model: tokenizer training, presets, loading any HF causal LM (Llama, Qwen2, GPT-2),
atomic standard saves that plain transformers reads, dropout off.

    python -m pytest tests/test_model.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsmith.chat.render import render_chat, render_prompt
from chatsmith.chat.templates import BUILTIN_SPECIAL_TOKENS, get_format
from chatsmith.errors import ChatsmithError
from chatsmith.model import (PAD_TOKEN, PRESETS, build_tokenizer, count_parameters, create_model, disable_dropout,
                             load_model, max_context_length, restrict_embedding_training, save_model,
                             special_token_ids)
from chatsmith.planted import frozen_weight_masks, plant_induction_head, plant_previous_token_head
from conftest import SAMPLE_TEXTS

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of 東京 🙂?"},
]

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return build_tokenizer(SAMPLE_TEXTS, 400, "chatml")


@pytest.mark.parametrize("fmt", ["chatml", "llama2", "alpaca"])
def test_build_tokenizer_has_format_tokens_pad_and_template(fmt):
    tok = build_tokenizer(SAMPLE_TEXTS, 360, fmt)
    chat = get_format(fmt)
    vocab = tok.get_vocab()
    for special in BUILTIN_SPECIAL_TOKENS[fmt]:
        assert special in vocab and len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id not in chat.stop_token_ids(tok)
    assert tok.eos_token_id is not None and tok.eos_token == (chat.eos_token or "<|endoftext|>")
    assert tok.chat_template == chat.template
    assert len(tok) <= 360
    assert tok.encode("Paris", add_special_tokens=False)[0] != tok.bos_token_id   # no bos added implicitly


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40))
def test_tokenizer_round_trips_any_unicode(chatml_tokenizer, text):
    ids = chatml_tokenizer.encode(text, add_special_tokens=False)
    assert chatml_tokenizer.decode(ids) == text


def test_tokenizer_round_trips_hard_cases(chatml_tokenizer):
    for text in [" leading", "trailing  ", "a\tb\r\nc", "  two  spaces ", "é vs é", "🙂🙂", "\x00\x7f", "\u200b"]:
        assert chatml_tokenizer.decode(chatml_tokenizer.encode(text, add_special_tokens=False)) == text


def test_presets_sizes(chatml_tokenizer):
    class FakeTok:   # a 4096-entry vocabulary, as the tiny preset trains
        pad_token_id, bos_token_id, eos_token_id = 0, None, 1
        model_max_length = None

        def __len__(self):
            return PRESETS["tiny"]["vocab_size"]

    with torch.device("meta"):              # sizes only: no memory, no init time
        tiny = create_model("tiny", FakeTok())
    assert 3e6 <= count_parameters(tiny) <= 5e6
    assert tiny.config.tie_word_embeddings and tiny.config.hidden_act == "silu"
    assert tiny.config._attn_implementation == "sdpa"
    assert type(tiny.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"
    # small: count from the config without allocating it (it is ~25 M)
    s = PRESETS["small"]
    d, f, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    small = s["vocab_size"] * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    assert 20e6 <= small <= 30e6
    with pytest.raises(ChatsmithError, match="unknown preset"):
        create_model("huge", chatml_tokenizer)


def test_save_then_plain_transformers_load_and_render_the_same(tmp_path, chatml_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = create_model(SMALL, chatml_tokenizer)
    out = save_model(model, chatml_tokenizer, tmp_path / "m", extra_files={"chatsmith.json": '{"stage": "base"}'})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "chatsmith.json"} <= names
    assert not list(tmp_path.glob(".m.*")), "no temp directory left behind"
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    hf_model = AutoModelForCausalLM.from_pretrained(str(out))
    fmt = get_format("chatml")
    for gen_prompt in (False, True):
        text = hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen_prompt)
        assert text == fmt.render_text(CONVERSATION, add_generation_prompt=gen_prompt)
        assert text == render_chat(CONVERSATION, hf_tok, fmt, add_generation_prompt=gen_prompt).text
    ids = torch.tensor([render_prompt(CONVERSATION, hf_tok, fmt)])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits)
    loaded = load_model(out, device="cpu")
    assert loaded.fmt.name == "chatml" and loaded.tokenizer.pad_token == PAD_TOKEN
    assert not loaded.model.training and len(loaded.tokenizer) == len(chatml_tokenizer)
    # saving again replaces the directory atomically
    save_model(loaded.model, loaded.tokenizer, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not (tmp_path / "m.old").exists()


def _save_hf_dir(path, model, tokenizer):
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _plain_tokenizer(**special):
    """A byte-level tokenizer with no chat template (and, unless given, no pad token), like GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SAMPLE_TEXTS, trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   **special)


def test_load_gpt2_without_template_or_pad(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _plain_tokenizer()
    assert tok.pad_token is None and not tok.chat_template
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    path = _save_hf_dir(tmp_path / "gpt2", model, tok)
    with pytest.raises(ChatsmithError, match="--template"):
        load_model(path, device="cpu")
    raw = load_model(path, device="cpu", require_template=False)
    assert raw.fmt is None and raw.tokenizer.pad_token == PAD_TOKEN

    loaded = load_model(path, device="cpu", template="chatml")
    tok2, model2 = loaded.tokenizer, loaded.model
    assert loaded.fmt.name == "chatml" and tok2.chat_template == get_format("chatml").template
    for special in ("<|im_start|>", "<|im_end|>", PAD_TOKEN):
        assert len(tok2.encode(special, add_special_tokens=False)) == 1
    assert tok2.pad_token_id != tok2.eos_token_id
    assert model2.get_input_embeddings().weight.shape[0] == len(tok2) == len(tok) + 3
    assert model2.config.pad_token_id == tok2.pad_token_id
    # it runs, with absolute positions, on a rendered prompt
    ids = torch.tensor([render_prompt(CONVERSATION, tok2, loaded.fmt)])
    with torch.no_grad():
        assert torch.isfinite(model2(ids).logits).all()
    # saved, the template travels with it
    out = save_model(model2, tok2, tmp_path / "gpt2-chat")
    again = load_model(out, device="cpu")
    assert again.fmt.name == "chatml" and len(again.tokenizer) == len(tok2)


def test_load_qwen2_with_its_own_template_and_pad_equal_to_eos(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _plain_tokenizer(pad_token="<|endoftext|>")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = get_format("chatml").template
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                         max_position_embeddings=64))
    path = _save_hf_dir(tmp_path / "qwen2", model, tok)
    loaded = load_model(path, device="cpu")
    assert loaded.fmt.name == "chatml"
    # the pad token was the eos (a stop token): replaced by a pad token of its own
    assert loaded.tokenizer.pad_token == PAD_TOKEN
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(tok) + 1
    assert max_context_length(loaded.model, loaded.tokenizer) == 64


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ChatsmithError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatsmithError, match="config.json"):
        load_model(tmp_path / "empty")


def test_disable_dropout(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                       resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3))
    disable_dropout(model)
    model.train()
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits)
    assert model.config.resid_pdrop == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_restrict_embedding_training_moves_only_allowed_rows(chatml_tokenizer, tie):
    """Adam turns the softmax's small, steady push on tokens absent from a batch into full-size steps
    (mode 'all' moves them); 'seen' trains the data's tokens and the special ones, 'special' only the
    latter; neither touches a row the data never shows."""
    fmt = get_format("chatml")
    special = special_token_ids(chatml_tokenizer, fmt)
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in special and chatml_tokenizer.pad_token_id in special
    ids = torch.tensor([chatml_tokenizer.encode("What is the capital of France?<|im_end|>",
                                                add_special_tokens=False)])
    absent = next(i for i in range(len(chatml_tokenizer)) if i not in set(ids[0].tolist()) | set(special))
    moved = {}
    for mode in ("all", "seen", "special", "none"):
        torch.manual_seed(0)
        model = create_model(dict(SMALL, tie_word_embeddings=tie), chatml_tokenizer)
        restrict_embedding_training(model, chatml_tokenizer, fmt, mode, seen_ids=ids[0].tolist())
        layers = [model.get_input_embeddings()] + ([] if tie else [model.get_output_embeddings()])
        before = [layer.weight.detach().clone() for layer in layers]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        after = [layer.weight.detach() for layer in layers]
        moved[mode] = {"absent": max((a[absent] - b[absent]).abs().max().item() for a, b in zip(after, before)),
                       "special": max((a[im_end] - b[im_end]).abs().max().item() for a, b in zip(after, before)),
                       "ordinary": max((a[ids[0, 0]] - b[ids[0, 0]]).abs().max().item()
                                       for a, b in zip(after, before))}
    assert moved["all"]["absent"] > 1e-3          # the drift that the other modes exist to stop
    assert moved["seen"]["absent"] == 0.0
    assert moved["seen"]["ordinary"] > 1e-3 and moved["seen"]["special"] > 1e-3
    assert moved["special"]["absent"] == 0.0 and moved["special"]["ordinary"] == 0.0
    assert moved["special"]["special"] > 1e-3
    assert moved["none"]["special"] == 0.0 and moved["none"]["ordinary"] == 0.0
    with pytest.raises(ChatsmithError, match="seen"):
        restrict_embedding_training(model, chatml_tokenizer, fmt, "seen")
    with pytest.raises(ChatsmithError, match="train_embeddings"):
        restrict_embedding_training(model, chatml_tokenizer, fmt, "some")


PREV_TOKEN_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=128, max_position_embeddings=128)


def _attention_to_previous_token(model, ids: torch.Tensor) -> torch.Tensor:
    """Per head of layer 0: the mean attention weight each position gives the one before it."""
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions[0]      # (b, heads, T, T)
    pos = torch.arange(1, ids.shape[1])
    return weights[:, :, pos, pos - 1].mean((0, 2))


def test_prev_token_init_plants_a_previous_token_head(chatml_tokenizer):
    torch.manual_seed(0)
    ids = torch.randint(10, len(chatml_tokenizer), (4, 128))
    torch.manual_seed(1)
    planted = _attention_to_previous_token(create_model(PREV_TOKEN_MODEL, chatml_tokenizer, init="prev-token"), ids)
    torch.manual_seed(1)
    standard = _attention_to_previous_token(create_model(PREV_TOKEN_MODEL, chatml_tokenizer), ids)
    assert planted[0] > 0.95                        # at every distance up to the context length
    assert standard.max() < 0.3 and planted[1:].max() < 0.3   # only head 0 is set


def test_prev_token_init_refuses_other_architectures(chatml_tokenizer):
    model = create_model(PREV_TOKEN_MODEL, chatml_tokenizer)
    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ChatsmithError, match="default RoPE"):
        plant_previous_token_head(model)
    with pytest.raises(ChatsmithError, match="unknown initialisation"):
        create_model(PREV_TOKEN_MODEL, chatml_tokenizer, init="xavier")


def _repeated_segments(vocab: int, n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    segment = torch.randint(10, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([segment, segment], 1)


def test_induction_init_attends_to_the_token_after_the_earlier_occurrence_and_copies_it(chatml_tokenizer):
    ids = _repeated_segments(len(chatml_tokenizer))
    length = ids.shape[1] // 2
    later = torch.arange(length + 1, 2 * length)          # second copy: x[i] == x[i - length]
    losses = {}
    for init in ("induction", "prev-token"):
        torch.manual_seed(1)
        model = create_model(PREV_TOKEN_MODEL, chatml_tokenizer, init=init)
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            out = model(ids, output_attentions=True)
        attention = out.attentions[1][:, 0]               # layer 1, head 0: (b, T, T)
        on_target = attention[:, later, later - length + 1].mean()   # the token after the earlier x[i]
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        losses[init] = (float(nll[:, :length - 1].mean()), float(nll[:, length:].mean()))
        if init == "induction":
            assert on_target > 0.6                        # uniform attention would give 1/T < 0.03
        else:
            assert on_target < 0.2
    first, second = losses["induction"]
    assert second < first - 0.2                          # the copy lowers the loss of the repeat at init
    assert abs(losses["prev-token"][1] - losses["prev-token"][0]) < 0.2


def test_induction_circuit_stays_frozen_through_training_and_saving(chatml_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from chatsmith.train.config import TrainConfig
    from chatsmith.train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(PREV_TOKEN_MODEL, chatml_tokenizer, init="induction")
    masks = {name: mask.bool() for name, _, mask in frozen_weight_masks(model)}
    assert "model.layers.1.self_attn.q_proj.weight" in masks and "model.embed_tokens.weight" in masks
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1, freeze_planted=True))
    ids = torch.randint(10, len(chatml_tokenizer), (4, 32), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        if name in masks:
            assert not moved[masks[name]].any(), name     # frozen slices: bit-identical
            assert moved[~masks[name]].any(), name        # the rest of the tensor trains
    save_model(model, chatml_tokenizer, tmp_path / "m")
    for loader in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        reloaded = loader.from_pretrained(str(tmp_path / "m"))
        assert {n for n, _, _ in frozen_weight_masks(reloaded)} == set(masks)   # the reward model keeps it too


def test_planted_slices_train_unless_the_run_asks_to_freeze_them(chatml_tokenizer):
    """Freezing is a training option (--freeze-planted), never a side effect of the model's config: without it
    every listed slice trains like the rest. And pretraining plants nothing unless asked."""
    from chatsmith.train.config import TrainConfig
    from chatsmith.train.optim import build_optimizer
    from chatsmith.train.pretrain import PretrainConfig

    assert PretrainConfig().init == "standard" and not TrainConfig().freeze_planted
    assert frozen_weight_masks(create_model(PREV_TOKEN_MODEL, chatml_tokenizer)) == []
    torch.manual_seed(0)
    model = create_model(PREV_TOKEN_MODEL, chatml_tokenizer, init="induction")
    masks = {name: mask.bool() for name, _, mask in frozen_weight_masks(model)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    ids = torch.randint(10, len(chatml_tokenizer), (4, 32), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name].detach() != before[name])[mask].any(), name   # the listed slices moved


def test_induction_init_refuses_a_model_without_room(chatml_tokenizer):
    model = create_model(dict(PREV_TOKEN_MODEL, num_hidden_layers=1), chatml_tokenizer)
    with pytest.raises(ChatsmithError, match="2 decoder layers"):
        plant_induction_head(model)
