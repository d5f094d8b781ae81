"""Tests for the one continuous-batching engine the RL rollouts sample through (chatsmith.generate.continuous):
greedy tokens equal the batch engine's, sampled tokens equal it at the same seed whatever the cap on
running rows, finished rows leave and queued prompts join, a repeated prompt is prefilled once, and
PPO/GRPO rollouts are the same with any --rollout-max-batch.

    python -m pytest tests/test_rollout_engine.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.generate import SamplingConfig, generate
from chatsmith.generate.batch import DecodeBatch
from chatsmith.generate.continuous import ContinuousBatch, generate_continuous
from chatsmith.train.rollout import collect_rollout
from conftest import SAMPLE_TEXTS
# The tiny Llama (induction heads, so greedy outputs differ by prompt) and GPT-2 of the batch engine's tests.
from test_serve_batch import gpt2, llama, tok  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(tok, distinct=5, repeats=3, seed=0):
    """GRPO-shaped prompts: `distinct` prompts of mixed lengths, each repeated `repeats` times in a row."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(SAMPLE_TEXTS).split()[: rng.randint(1, 30)]) for _ in range(distinct)]
    return [tok.encode(t) for t in texts for _ in range(repeats)]


def _stops(tok, model, prompts):
    """Stop ids that end some rows early: tokens the greedy model emits after a few steps."""
    out = generate(model, tok, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0, logprobs=False))
    return sorted({seq[-1] for seq in out.sequences[::4]})


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_greedy_and_seeded_samples_equal_the_batch_engine(request, tok, which):
    model = request.getfixturevalue(which)
    prompts = _prompts(tok)
    stop = _stops(tok, model, prompts)
    for temperature in (0.0, 0.8):
        cfg = lambda: SamplingConfig(max_new_tokens=24, temperature=temperature, seed=5,  # noqa: E731
                                     stop_token_ids=stop, logprobs=False)
        old = generate(model, tok, prompts, cfg())
        lengths = {len(s) for s in old.sequences}
        assert len(lengths) > 1, "rows must finish at different steps for this test to mean something"
        for max_batch in (0, 4):
            new = generate_continuous(model, tok, prompts, cfg(), max_batch=max_batch)
            assert new.sequences == old.sequences, (which, temperature, max_batch)
            assert new.finished == old.finished and new.texts == old.texts


def test_same_seed_same_samples_other_seed_differs(tok, llama):
    prompts = _prompts(tok, distinct=3, repeats=2)
    cfg = lambda seed: SamplingConfig(max_new_tokens=12, temperature=1.0, seed=seed, logprobs=False)  # noqa: E731
    a = generate_continuous(llama, tok, prompts, cfg(1), max_batch=3).sequences
    assert a == generate_continuous(llama, tok, prompts, cfg(1), max_batch=3).sequences
    assert a == generate_continuous(llama, tok, prompts, cfg(1), max_batch=5).sequences
    assert a != generate_continuous(llama, tok, prompts, cfg(2), max_batch=3).sequences
    # first_row: a slice of the batch samples what those rows sample in the whole batch
    part = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=1, logprobs=False, first_row=2)
    assert generate_continuous(llama, tok, prompts[2:], part).sequences == a[2:]


def test_finished_rows_leave_and_queued_prompts_join(tok, llama):
    """With a cap of 3 running rows the batch never exceeds 3 rows, and once short rows finish the
    queued prompts fill their slots: total rows stepped equals the tokens sampled after each first one."""
    prompts = _prompts(tok, distinct=4, repeats=2)
    stop = _stops(tok, llama, prompts)
    sizes: list[int] = []
    original = ContinuousBatch.step

    def spy(self, push):
        sizes.append(len(self.running))
        return original(self, push)

    ContinuousBatch.step = spy
    try:
        out = generate_continuous(llama, tok, prompts, SamplingConfig(max_new_tokens=20, temperature=0.0,
                                                                      stop_token_ids=stop), max_batch=3)
    finally:
        ContinuousBatch.step = original
    assert max(sizes) == 3
    assert sum(sizes) == sum(len(s) - 1 for s in out.sequences)     # no step fed a finished row
    assert min(len(s) for s in out.sequences) < 20                 # some rows did stop early


def test_repeated_prompt_is_prefilled_once(tok, llama):
    calls: list[int] = []
    batch = DecodeBatch(llama)
    from chatsmith.generate import decoders

    original = decoders.FastDecoder.start

    def spy(self, input_ids, attention_mask, max_len, *rest):
        calls.append(input_ids.shape[0])
        return original(self, input_ids, attention_mask, max_len, *rest)

    decoders.FastDecoder.start = spy
    try:
        prompts = _prompts(tok, distinct=2, repeats=4)
        with torch.inference_mode():
            group, logits = batch.prefill(prompts)
    finally:
        decoders.FastDecoder.start = original
    assert calls == [2] and group.batch_size == 8 and logits.shape[0] == 8
    assert torch.equal(logits[0], logits[3]) and not torch.equal(logits[0], logits[4])


def test_repetition_penalty_is_refused(tok, llama):
    with pytest.raises(ChatsmithError, match="repetition_penalty"):
        generate_continuous(llama, tok, [[1, 2, 3]], SamplingConfig(repetition_penalty=1.3))


def test_rollout_is_the_same_for_any_max_batch(tok, llama):
    prompts = _prompts(tok, distinct=3, repeats=2)
    stop = _stops(tok, llama, prompts)
    runs = [collect_rollout(llama, None, tok, prompts, list(range(len(prompts))), max_new_tokens=16,
                            temperature=1.0, stop_token_ids=stop, seed=7, max_batch=mb) for mb in (0, 2)]
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert torch.allclose(runs[0].logprobs, runs[1].logprobs)
    assert runs[0].texts == runs[1].texts
