"""Tests for the sampling engine (chatsmith.generate): exactness against transformers, sampling
controls, seeds, stop tokens/strings, logprobs, streaming and the generate CLI.

    python -m pytest tests/test_generate.py -q
"""

from __future__ import annotations

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.generate import GenerationOutput, Generator, SamplingConfig, generate, stream
from chatsmith.generate.decoders import FastDecoder, fast_path_layers

PROMPTS = ["The capital of France", "Python is", "Hello, how can I help you today? I", "2 +"]


def _llama(vocab, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.2, **kw)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                      initializer_range=0.2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():   # Qwen2 has q/k/v biases: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    return {"llama": _llama(vocab), "qwen2": _qwen2(vocab), "gpt2": _gpt2(vocab)}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def _hf_greedy(model, prompt, n, pad_id):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                             eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_batched_equals_hf_generate_per_prompt(models, prompts, tiny_tokenizer, arch):
    model = models[arch]
    expected = [_hf_greedy(model, p, 10, tiny_tokenizer.pad_token_id) for p in prompts]
    out = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=10, temperature=0))
    assert out.sequences == expected            # batched + left-padded = each prompt alone
    assert out.finished == [False] * len(prompts)
    assert [len(lp) for lp in out.logprobs] == [10] * len(prompts)
    assert out.texts == [tiny_tokenizer.decode(s) for s in expected]


def test_fast_path_is_taken_only_for_plain_llama_family(models):
    assert fast_path_layers(models["llama"]) is not None
    assert fast_path_layers(models["qwen2"]) is not None
    assert fast_path_layers(models["gpt2"]) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_decoder_logits_match_model_forward(models, prompts, arch):
    model = models[arch]
    inner, head = fast_path_layers(model)
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    with torch.inference_mode():
        decoder = FastDecoder(model, inner, head)
        logits = decoder.start(ids, mask, longest + 3)
        next_tokens = logits.argmax(-1)
        step_logits = decoder.step(next_tokens)
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p + [int(next_tokens[i])]])).logits[0]
            torch.testing.assert_close(logits[i], ref[-2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step_logits[i], ref[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_are_those_of_the_temperature_scaled_distribution(models, prompts, tiny_tokenizer, arch):
    model = models[arch]
    temperature = 0.7
    out = generate(model, tiny_tokenizer, prompts[:2], SamplingConfig(max_new_tokens=6, temperature=temperature,
                                                                      seed=5))
    for prompt, seq, lps in zip(prompts, out.sequences, out.logprobs):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1:-1] / temperature
        ref = logits.log_softmax(-1).gather(1, torch.tensor(seq)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=1e-4)


def test_same_seed_same_output_and_independent_of_batch(models, prompts, tiny_tokenizer):
    model = models["llama"]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=123)
    a = generate(model, tiny_tokenizer, prompts, cfg)
    b = generate(model, tiny_tokenizer, prompts, cfg)
    assert a.sequences == b.sequences
    alone = generate(model, tiny_tokenizer, prompts[:1], cfg)
    assert alone.sequences[0] == a.sequences[0]          # other rows and their padding do not matter
    other = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=124))
    assert other.sequences != a.sequences
    # the same prompt twice in one batch gives two different samples (GRPO groups rely on it)
    twice = generate(model, tiny_tokenizer, [prompts[0], prompts[0]], cfg)
    assert twice.sequences[0] != twice.sequences[1]


@pytest.mark.parametrize("fast", [True, False])
def test_repeated_prompts_are_prefilled_once_and_sample_as_if_alone(models, prompts, tiny_tokenizer, monkeypatch,
                                                                    fast):
    from chatsmith.generate import decoders

    model = models["llama"]
    batch = [prompts[2], prompts[0], prompts[2], prompts[0], prompts[2]]       # two prompts, padded to one width
    alone = [generate(model, tiny_tokenizer, [p], SamplingConfig(max_new_tokens=10, temperature=1.0, seed=5,
                                                                 first_row=i)).sequences[0]
             for i, p in enumerate(batch)]
    prefill_rows = []
    decoder = decoders.FastDecoder if fast else decoders.HFDecoder
    start = decoder.start

    def counting_start(self, ids, *args):
        prefill_rows.append(ids.shape[0])
        return start(self, ids, *args)

    monkeypatch.setattr(decoder, "start", counting_start)
    out = Generator(model, tiny_tokenizer, fast=fast).generate(batch, SamplingConfig(max_new_tokens=10,
                                                                                      temperature=1.0, seed=5))
    assert prefill_rows == [2]                       # each distinct prompt once
    assert out.sequences == alone                    # every row samples what it samples on its own
    assert len({tuple(s) for s in out.sequences}) == 5


def test_distinct_rows_tells_padding_apart():
    from chatsmith.generate import distinct_rows

    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [5, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])      # row 3: same ids, 0 is a real token
    first, inverse = distinct_rows(ids, mask)
    assert first.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2]


def test_fast_and_generic_paths_sample_the_same_tokens(models, prompts, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    fast = Generator(models["llama"], tiny_tokenizer).generate(prompts, cfg)
    generic = Generator(models["llama"], tiny_tokenizer, fast=False).generate(prompts, cfg)
    assert fast.sequences == generic.sequences
    for x, y in zip(fast.logprobs, generic.logprobs):
        assert all(abs(p - q) < 1e-4 for p, q in zip(x, y))


def test_top_k_one_is_greedy_and_tiny_top_p_is_greedy(models, prompts, tiny_tokenizer):
    model = models["llama"]
    greedy = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=8, temperature=0)).sequences
    top1 = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=1,
                                                                   seed=1)).sequences
    nucleus = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5,
                                                                      top_p=1e-6, seed=2)).sequences
    assert top1 == greedy and nucleus == greedy


def test_top_k_restricts_samples_to_the_k_most_likely(models, prompts, tiny_tokenizer):
    model = models["gpt2"]
    prompt = prompts[1]
    with torch.inference_mode():
        top3 = set(model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist())
    out = generate(model, tiny_tokenizer, [prompt] * 24, SamplingConfig(max_new_tokens=1, temperature=5.0, top_k=3,
                                                                         seed=0))
    firsts = {seq[0] for seq in out.sequences}     # 24 rows = 24 independent draws
    assert firsts <= top3 and len(firsts) >= 2


def test_repetition_penalty_discourages_repeats(models, prompts, tiny_tokenizer):
    model = models["llama"]
    plain = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=20, temperature=0)).sequences
    penalised = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=20, temperature=0,
                                                                        repetition_penalty=3.0)).sequences

    def repeats(seqs, ps):
        return sum(sum(t in set(p + s[:i]) for i, t in enumerate(s)) for p, s in zip(ps, seqs))

    assert repeats(penalised, prompts) < repeats(plain, prompts)


def test_stop_token_ends_row_and_is_kept_in_sequence_not_text(models, prompts, tiny_tokenizer):
    model = models["llama"]
    free = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=12, temperature=0))
    stop = free.sequences[0][3]                     # a token row 0 produces at step 4
    out = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=12, temperature=0,
                                                                  stop_token_ids=[stop]))
    first = free.sequences[0].index(stop)
    assert out.sequences[0] == free.sequences[0][: first + 1]
    assert out.finished[0] is True
    assert out.texts[0] == tiny_tokenizer.decode(free.sequences[0][:first])
    for i in range(1, len(prompts)):                # rows that finish do not change the others
        if stop in free.sequences[i]:
            assert out.sequences[i] == free.sequences[i][: free.sequences[i].index(stop) + 1]
        else:
            assert out.sequences[i] == free.sequences[i] and not out.finished[i]
    assert len(out.logprobs[0]) == len(out.sequences[0])


def test_stop_string_spanning_tokens_is_found_and_stripped(models, prompts, tiny_tokenizer):
    model = models["llama"]
    free = generate(model, tiny_tokenizer, prompts[:1], SamplingConfig(max_new_tokens=16, temperature=0))
    text = free.texts[0]
    ids = free.sequences[0]
    # the text of two consecutive generated tokens (plain ASCII ones): a stop string spanning two tokens
    pieces = [tiny_tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    spans = [pieces[k + 2][len(pieces[k]):] for k in range(len(ids) - 1)
             if pieces[k + 2].startswith(pieces[k]) and len(pieces[k + 1]) > len(pieces[k])]
    spans = [t for t in spans if len(t) >= 2 and t.isascii() and t.isprintable()]
    assert spans, f"no ASCII token pair in {text!r}"
    stop_text = spans[0]
    out = generate(model, tiny_tokenizer, prompts[:1], SamplingConfig(max_new_tokens=16, temperature=0,
                                                                      stop_strings=[stop_text]))
    assert out.finished == [True]
    assert out.texts[0] == text[: text.find(stop_text)]
    assert stop_text not in out.texts[0]
    assert out.sequences[0] == ids[: len(out.sequences[0])] and len(out.sequences[0]) < len(ids)
    streamed = "".join(stream(model, tiny_tokenizer, prompts[0], SamplingConfig(max_new_tokens=16, temperature=0,
                                                                                stop_strings=[stop_text])))
    assert streamed == out.texts[0]


def test_stream_never_splits_a_multibyte_character(tiny_tokenizer):
    """Force a model to emit a byte-level token sequence that splits 🙂 and 東 across tokens."""
    text = "a🙂東b"
    byte_tokens = []
    for byte in text.encode("utf-8"):   # one single-byte token per byte: every multibyte char is split
        ids = [i for i in range(len(tiny_tokenizer)) if tiny_tokenizer.convert_ids_to_tokens(i) ==
               _byte_char(byte)]
        assert ids, f"byte {byte} has no single-byte token"
        byte_tokens.append(ids[0])
    model = _ScriptedLM(byte_tokens, len(tiny_tokenizer))
    pieces = list(stream(model, tiny_tokenizer, [1, 2], SamplingConfig(max_new_tokens=len(byte_tokens),
                                                                       temperature=0)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) >= 3                      # it did stream, piece by piece
    out = generate(model, tiny_tokenizer, [[1, 2]], SamplingConfig(max_new_tokens=len(byte_tokens), temperature=0))
    assert out.texts == [text] and out.sequences == [byte_tokens]


def test_stream_holds_back_a_partial_stop_string(tiny_tokenizer):
    text = "hi<END>tail"
    tokens = [_single_byte_token(tiny_tokenizer, b) for b in text.encode()]
    model = _ScriptedLM(tokens, len(tiny_tokenizer))
    cfg = SamplingConfig(max_new_tokens=len(tokens), temperature=0, stop_strings=["<END>"])
    pieces = list(stream(model, tiny_tokenizer, [1], cfg))
    assert "".join(pieces) == "hi" and not any("<" in p for p in pieces)
    out = generate(model, tiny_tokenizer, [[1]], cfg)
    assert out.texts == ["hi"] and out.finished == [True] and len(out.sequences[0]) == len("hi<END>")
    # an almost-stop that is not one is printed in the end
    text2 = "a<EN>b"
    model2 = _ScriptedLM([_single_byte_token(tiny_tokenizer, b) for b in text2.encode()], len(tiny_tokenizer))
    cfg2 = SamplingConfig(max_new_tokens=len(text2), temperature=0, stop_strings=["<END>"])
    assert "".join(stream(model2, tiny_tokenizer, [1], cfg2)) == text2


def test_sampling_restores_training_mode_and_disables_dropout(tiny_tokenizer, prompts):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2,
                                       n_positions=64, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    model.train()
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    a = generate(model, tiny_tokenizer, prompts[:2], cfg)
    b = generate(model, tiny_tokenizer, prompts[:2], cfg)
    assert a.sequences == b.sequences   # dropout would make greedy outputs differ
    assert model.training


def test_fast_path_sees_weight_updates(models, prompts, tiny_tokenizer):
    model = _llama(len(tiny_tokenizer))
    cfg = SamplingConfig(max_new_tokens=5, temperature=0)
    generate(model, tiny_tokenizer, prompts, cfg)
    with torch.no_grad():                        # like an optimizer step: in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = generate(model, tiny_tokenizer, prompts, cfg)
    assert out.sequences == [_hf_greedy(model, p, 5, tiny_tokenizer.pad_token_id) for p in prompts]


def test_errors_and_edge_cases(models, prompts, tiny_tokenizer):
    model = models["llama"]
    with pytest.raises(ChatsmithError, match="empty"):
        generate(model, tiny_tokenizer, [[]], SamplingConfig())
    with pytest.raises(ChatsmithError, match="top_p"):
        generate(model, tiny_tokenizer, prompts, SamplingConfig(top_p=0))
    with pytest.raises(ChatsmithError, match="context"):
        generate(model, tiny_tokenizer, [[5] * 200], SamplingConfig())
    assert generate(model, tiny_tokenizer, [], SamplingConfig()).sequences == []
    zero = generate(model, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=0))
    assert zero.sequences == [[]] * len(prompts) and zero.texts == [""] * len(prompts)
    # generation stops at the model's context length
    near = generate(model, tiny_tokenizer, [[5] * 125], SamplingConfig(max_new_tokens=50, temperature=0))
    assert len(near.sequences[0]) == 3
    assert isinstance(near, GenerationOutput)


def test_generate_cli_streams_a_raw_completion(tmp_path, capsys):
    from chatsmith.cli import main
    from chatsmith.model import build_tokenizer, create_model, save_model
    from conftest import SAMPLE_TEXTS

    tok = build_tokenizer(SAMPLE_TEXTS, 400, "chatml")
    torch.manual_seed(0)
    model = create_model(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=64), tok)
    save_model(model, tok, tmp_path / "m")
    capsys.readouterr()
    rc = main(["generate", str(tmp_path / "m"), "--prompt", "The capital of", "--max-new-tokens", "7",
               "--temperature", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    ids = tok.encode("The capital of")
    expected = generate(model, tok, [ids], SamplingConfig(max_new_tokens=7, temperature=0,
                                                          stop_token_ids=[tok.eos_token_id]))
    assert printed == expected.texts[0] + "\n"
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2


# ----------------------------------------------------------------------------- helpers

class _ScriptedLM(torch.nn.Module):
    """A 'model' whose logits spell a fixed token script (position = number of tokens seen)."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        from transformers import PretrainedConfig

        self.script, self.vocab = script, vocab
        self.config = PretrainedConfig()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0):
        from types import SimpleNamespace

        seen = (past_key_values or 0) + input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        step = seen - self._prompt_len if past_key_values else 0
        if past_key_values is None:
            self._prompt_len = input_ids.shape[1]
        token = self.script[min(step, len(self.script) - 1)]
        logits[:, -1, token] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=seen)


def _byte_char(byte: int) -> str:
    from chatsmith.generate.text import gpt2_unicode_to_byte

    return {b: c for c, b in gpt2_unicode_to_byte().items()}[byte]


def _single_byte_token(tokenizer, byte: int) -> int:
    return tokenizer.convert_tokens_to_ids(_byte_char(byte))

