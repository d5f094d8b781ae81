"""Tests for continuous batching without HTTP (chatsmith.generate.batch / row_sampling,
chatsmith.serve.scheduler): jobs that join
and leave a running batch sample exactly what they sample alone, on the fast Llama path and the generic
transformers-cache path (a GPT-2); cancellation, stop tokens/strings, the bounded queue.

    python -m pytest tests/test_serve_batch.py -q
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from chatsmith.generate import SamplingConfig, generate
from chatsmith.generate.batch import left_pad_cat
from chatsmith.generate.row_sampling import RowSampling, choice_seed, sample_rows
from chatsmith.serve.scheduler import Job, QueueFull, Scheduler, length_groups
from conftest import SAMPLE_TEXTS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(chatml_tok):
    return chatml_tok


@pytest.fixture(scope="module")
def llama(induction_llama):
    return induction_llama


@pytest.fixture(scope="module")
def gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _prompts(tok, count, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(SAMPLE_TEXTS).split()[: rng.randint(1, 30)]) for _ in range(count)]
    return [tok.encode(t) for t in texts], [rng.randint(1, 50) for _ in range(count)]


def _run(scheduler, jobs_args, stagger=0.002, seed=0):
    """Submit jobs one by one with small random gaps (so they join a running batch); wait for all."""
    rng = random.Random(seed)
    finished = {}
    all_done = threading.Event()

    def emitter(i):
        def emit(event):
            if event.kind in ("done", "error"):
                finished[i] = event
                if len(finished) == len(jobs_args):
                    all_done.set()
        return emit

    jobs = [Job(p, m, s, emitter(i), **extra) for i, (p, m, s, extra) in enumerate(jobs_args)]
    for job in jobs:
        scheduler.submit([job])
        time.sleep(rng.random() * stagger)
    assert all_done.wait(120), "jobs did not finish"
    return jobs, [finished[i] for i in range(len(jobs))]


@pytest.fixture(scope="module")
def windowed(tok):
    """A Mistral with a sliding window: its transformers cache cannot be re-padded, so it runs one group
    of requests at a time."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=16)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("which", ["llama", "gpt2", "windowed"])
def test_greedy_and_seeded_jobs_equal_alone(which, tok, request):
    model = request.getfixturevalue(which)
    prompts, max_new = _prompts(tok, 20)
    settings = [RowSampling(0.0) if i % 2 else RowSampling(0.9, top_p=0.9, top_k=50, seed=choice_seed(i, 0))
                for i in range(len(prompts))]
    scheduler = Scheduler(model, tok, max_batch=6, max_queue=64).start()
    try:
        jobs, events = _run(scheduler, [(p, m, s, {}) for p, m, s in zip(prompts, max_new, settings)])
        assert (scheduler.batch.fast is None) == (which != "llama")         # the generic path for the others
        assert scheduler.batch.can_merge == (which != "windowed")
        if scheduler.batch.can_merge:
            assert scheduler.rows_stepped > 2 * scheduler.steps      # rows really ran together
        deadline = time.monotonic() + 10          # the last "done" is sent just before its row leaves
        while (scheduler.running or scheduler.batch.decoder is not None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.batch.decoder is None and not scheduler.running
        # each job alone, on a fresh scheduler: same tokens
        for p, m, s, job in zip(prompts, max_new, settings, jobs):
            alone, _ = _run(scheduler, [(p, m, RowSampling(s.temperature, s.top_p, s.top_k, s.seed), {})], 0)
            assert alone[0].tokens == job.tokens
    finally:
        scheduler.stop()
    assert all(e.finish_reason == "length" and e.completion_tokens == m for e, m in zip(events, max_new))
    # greedy rows also equal the sampling engine's own greedy output
    for i in range(1, len(prompts), 2):
        ref = generate(model, tok, [prompts[i]], SamplingConfig(max_new_tokens=max_new[i], temperature=0,
                                                                logprobs=False), fast=which == "llama")
        assert jobs[i].tokens == ref.sequences[0]


def test_stop_token_stop_string_and_texts(tok, llama):
    prompts, _ = _prompts(tok, 4, seed=3)
    alone = generate(llama, tok, prompts, SamplingConfig(max_new_tokens=30, temperature=0, logprobs=False))
    stop_token = alone.sequences[0][5]
    text1 = alone.texts[1]
    stop_text = next(text1[i:i + 3] for i in range(4, len(text1) - 3) if text1[i:i + 3].isascii()
                     and text1[i:i + 3].strip())
    scheduler = Scheduler(llama, tok, max_batch=4).start()
    try:
        pieces = {0: [], 1: []}
        done = {}
        ready = threading.Event()

        def emitter(i):
            def emit(event):
                if event.kind == "text":
                    pieces[i].append(event.text)
                else:
                    done[i] = event
                    if len(done) == 2:
                        ready.set()
            return emit

        jobs = [Job(prompts[0], 30, RowSampling(0.0), emitter(0), stop_ids=frozenset([stop_token])),
                Job(prompts[1], 30, RowSampling(0.0), emitter(1), stop_strings=(stop_text,))]
        scheduler.submit(jobs)
        assert ready.wait(60)
    finally:
        scheduler.stop()
    first = alone.sequences[0].index(stop_token)
    assert jobs[0].tokens == alone.sequences[0][: first + 1] and done[0].finish_reason == "stop"
    assert "".join(pieces[0]) == tok.decode(alone.sequences[0][:first])
    assert done[1].finish_reason == "stop"
    assert "".join(pieces[1]) == text1[: text1.index(stop_text)]


def test_cancelled_job_leaves_others_finish(tok, llama):
    prompts, _ = _prompts(tok, 3, seed=5)
    scheduler = Scheduler(llama, tok, max_batch=4).start()
    got = {}
    ready = threading.Event()
    steps = [0]

    def emitter(i):
        def emit(event):
            if event.kind == "text" and i == 0:
                steps[0] += 1
                if steps[0] == 3:
                    jobs[0].cancel()
            if event.kind == "done":
                got[i] = event
                if len(got) == 3:
                    ready.set()
        return emit

    jobs = [Job(p, 200, RowSampling(0.0), emitter(i)) for i, p in enumerate(prompts)]
    try:
        scheduler.submit(jobs)
        assert ready.wait(60)
    finally:
        scheduler.stop()
    assert got[0].finish_reason == "cancelled" and len(jobs[0].tokens) < 200
    assert got[1].finish_reason == got[2].finish_reason == "length"
    ref = generate(llama, tok, prompts[1:], SamplingConfig(max_new_tokens=200, temperature=0, logprobs=False))
    assert [jobs[1].tokens, jobs[2].tokens] == ref.sequences


def test_bounded_queue(tok, llama):
    scheduler = Scheduler(llama, tok, max_batch=2, max_queue=3)     # not started: nothing leaves the queue
    job = lambda: Job([1, 2, 3], 4, RowSampling(0.0), lambda e: None)   # noqa: E731
    scheduler.submit([job() for _ in range(5)])                          # 2 slots + 3 waiting
    with pytest.raises(QueueFull):
        scheduler.submit([job()])
    assert scheduler.queue_depth == 5


def test_left_pad_cat_and_row_sampling():
    a = torch.arange(6).view(2, 3)
    b = torch.arange(10, 15).view(1, 5)
    out = left_pad_cat(a, 3, b, 5, dim=1, capacity=7, fill=-1)
    assert out.tolist() == [[-1, -1, 0, 1, 2, -1, -1], [-1, -1, 3, 4, 5, -1, -1], [10, 11, 12, 13, 14, -1, -1]]
    lazy = left_pad_cat(a, 3, b, 5, dim=1, capacity=7, fill=-1, fill_future=False)
    assert lazy[:, :5].tolist() == [row[:5] for row in out.tolist()]     # only the future columns may differ
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    rows = lambda: [RowSampling(0.0), RowSampling(1.0, seed=11), RowSampling(0.7, top_p=0.5, seed=12)]  # noqa: E731
    first, second = rows(), rows()
    a_tokens = [sample_rows(logits, first).tolist() for _ in range(20)]
    # a row's samples do not depend on the rows beside it
    alone = [sample_rows(logits[1:2], second[1:2]).tolist()[0] for _ in range(20)]
    assert [t[1] for t in a_tokens] == alone
    assert all(t[0] == int(logits[0].argmax()) for t in a_tokens)
    probs, order = torch.sort((logits[2] / 0.7).softmax(-1), descending=True)
    nucleus = set(order[(probs.cumsum(-1) - probs) < 0.5].tolist())
    assert {t[2] for t in a_tokens} <= nucleus
    assert choice_seed(5, 0) == choice_seed(5, 0) != choice_seed(5, 1)


def test_rows_sharing_a_noise_block_sample_what_they_sample_alone():
    """Rows that draw their noise together (one block) keep their own streams: rows leaving mid-block,
    a row joining later and different step budgets change nothing."""
    torch.manual_seed(1)
    logits = torch.randn(40, 5, 300)                       # (steps, rows, vocab)
    rows = lambda: [RowSampling(1.0, seed=choice_seed(3, i)) for i in range(5)]  # noqa: E731
    budget = [40, 7, 40, 25, 40]
    alone = []
    for i, row in enumerate(rows()):
        alone.append([int(sample_rows(logits[s, i:i + 1], [row], [budget[i] - s])) for s in range(budget[i])])
    together, live, late = rows(), [0, 1, 2, 3], 4             # row 4 joins at step 10; rows 1 and 3 leave
    got: dict[int, list[int]] = {i: [] for i in range(5)}
    for s in range(40):
        if s == 10:
            live.append(late)
        tokens = sample_rows(logits[s, live], [together[i] for i in live],
                             [budget[i] - len(got[i]) for i in live]).tolist()
        for i, t in zip(live, tokens):
            got[i].append(t)
        live = [i for i in live if len(got[i]) < budget[i]]
    assert [got[i] for i in range(4)] == alone[:4]
    # the late row read its logits from step 10 on: compare with it alone on those logits
    row = rows()[4]
    late_alone = [int(sample_rows(logits[s, 4:5], [row], [40 - (s - 10)])) for s in range(10, 40)]
    assert got[4] == late_alone
    assert len({tuple(g) for g in alone}) == 5                 # the streams differ


def test_length_groups_bound_padding():
    lengths = [30, 5, 6, 29, 100, 5, 31, 7]
    groups = length_groups(lengths, waste=0.2)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert padded - sum(lengths[i] for i in g) <= 0.2 * padded
    assert [sorted(lengths[i] for i in g) for g in groups] == [[5, 5, 6, 7], [29, 30, 31], [100]]


def test_fast_decoder_keep_moves_rows_in_place(llama, tok):
    """Finished rows leaving (increasing indices) compact the cache in place; repeated rows (a prompt's
    cache row copied) build a new one; both continue exactly like the rows decoded on their own."""
    from chatsmith.generate.decoders import FastDecoder, fast_path_layers

    prompts, _ = _prompts(tok, 5, seed=3)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    parts = fast_path_layers(llama)

    def logits_after(rows, steps=3):
        dec = FastDecoder(llama, *parts)
        with torch.inference_mode():
            dec.start(ids, mask, longest + steps + 1)
            storage = dec.kv[0].untyped_storage().data_ptr()
            dec.keep(torch.tensor(rows))
            in_place = dec.kv[0].untyped_storage().data_ptr() == storage
            out = [dec.step(torch.full((len(rows),), 5 + s)) for s in range(steps)]
        return torch.stack(out), in_place

    def alone(row, steps=3):
        dec = FastDecoder(llama, *parts)
        with torch.inference_mode():
            dec.start(ids[row:row + 1], mask[row:row + 1], longest + steps + 1)
            return torch.stack([dec.step(torch.full((1,), 5 + s)) for s in range(steps)])[:, 0]

    for rows, expect_in_place in (([0, 2, 3], True), ([1, 4], True), ([0, 1, 2], True), ([3, 3, 0], False)):
        out, in_place = logits_after(rows)
        assert in_place == expect_in_place, rows
        for slot, row in enumerate(rows):
            torch.testing.assert_close(out[:, slot], alone(row), rtol=1e-4, atol=1e-5)
