"""Real architectures: every family of tests/families.py saves, reloads in plain transformers, loads in
chatsmith, and chatsmith's greedy sampling equals `model.generate` token for token (also past a sliding
attention window); `chatsmith sft` and `chatsmith generate` run on each; a Hub id given as the model
reaches transformers' loader (offline here, so its error is what the user sees).

Run: `python -m pytest tests/test_architectures.py -q`
"""

from __future__ import annotations

import pytest
import torch

from chatsmith.chat import get_format, render_chat, render_prompt
from chatsmith.generate import SamplingConfig, generate
from chatsmith.generate.decoders import fast_path_layers
from chatsmith.model import load_model, save_model
from conftest import run_chat_cli
from families import FAMILIES, build_family

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "What is the capital of France? Paris is in Europe."},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And Germany?"}],
]
NEW_TOKENS = 12


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding of one prompt (no stop token; explicit all-ones attention mask,
    since a prompt may contain the pad token, e.g. GPT-2's `<|endoftext|>` between turns)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """(family name, directory) of a family's tiny model saved with chatsmith's `save_model`."""
    name = request.param
    model, tokenizer = build_family(name)
    out = tmp_path_factory.mktemp(name)
    save_model(model, tokenizer, out)
    return name, out


def test_saved_model_reloads_in_transformers_and_greedy_sampling_matches(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path = saved
    family = FAMILIES[name]
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == family.model
    assert tokenizer.chat_template == family.template
    fmt = get_format(None, tokenizer)
    for conversation in CONVERSATIONS:   # chatsmith renders what transformers renders
        assert render_chat(conversation, tokenizer, fmt, add_generation_prompt=True).text == (
            tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    prompts = [render_prompt(c, tokenizer, fmt) for c in CONVERSATIONS]
    assert len({len(p) for p in prompts}) == 2   # one batch, left-padded
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    out = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0))
    assert out.sequences == expected
    if fast_path_layers(model) is not None:   # Llama-family: the generic decoder agrees too
        generic = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0),
                           fast=False)
        assert generic.sequences == expected


@pytest.mark.parametrize("name, window", [("mistral", 16), ("qwen2", 16)])
def test_sliding_window_attention_matches_transformers(name, window):
    """Mistral v0.1 (and Qwen2 with use_sliding_window) attend to the last `window` positions only:
    greedy sampling past the window still equals transformers', and the fast decoder (which attends to
    every position) is used only while the window cannot bind."""
    import dataclasses

    from families import build_model, build_tokenizer

    extra = {"sliding_window": window}
    if name == "qwen2":
        extra.update(use_sliding_window=True, max_window_layers=1)
    family = dataclasses.replace(FAMILIES[name], fields=dict(FAMILIES[name].fields, **extra))
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer)
    fmt = get_format(None, tokenizer)
    prompts = [render_prompt(c, tokenizer, fmt) for c in CONVERSATIONS]
    assert max(len(p) for p in prompts) > window
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    assert generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0)).sequences \
        == expected
    assert fast_path_layers(model, window + 1) is None and fast_path_layers(model) is None
    if name == "mistral":   # (Qwen2's sliding layers carry the window themselves: always the generic path)
        assert fast_path_layers(model, window) is not None


def test_load_model_takes_every_family(saved):
    name, path = saved
    family = FAMILIES[name]
    loaded = load_model(path, device="cpu")
    assert type(loaded.model).__name__ == family.model
    assert loaded.fmt.template == family.template
    assert family.end_of_turn in loaded.fmt.stop_strings
    stops = set(loaded.fmt.stop_token_ids(loaded.tokenizer)) | {loaded.tokenizer.eos_token_id}
    assert loaded.tokenizer.convert_tokens_to_ids(family.end_of_turn) in stops
    assert loaded.tokenizer.pad_token_id is not None and loaded.tokenizer.pad_token_id not in stops
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    assert rows >= len(loaded.tokenizer)
    # greedy decoding still matches transformers after load_model (pad token added, embeddings resized)
    prompt = render_prompt(CONVERSATIONS[1], loaded.tokenizer, loaded.fmt)
    out = generate(loaded.model, loaded.tokenizer, [prompt], SamplingConfig(max_new_tokens=6, temperature=0))
    assert out.sequences == [hf_greedy(loaded.model, prompt, 6)]


def test_sft_and_generate_commands_run_on_every_family(saved, tmp_path, capsys):
    """One SFT step through the CLI on the family's own template; the result reloads in transformers with
    the same template, and `chatsmith generate` samples from it."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsmith.cli import main

    name, path = saved
    family = FAMILIES[name]
    data = tmp_path / "sft.jsonl"
    system = [{"role": "system", "content": "Be brief."}] if family.system else []
    with open(data, "w", encoding="utf-8") as f:
        for i in range(4):
            messages = system + [{"role": "user", "content": f"What is {i} + {i}?"},
                                 {"role": "assistant", "content": f"{2 * i}."},
                                 {"role": "user", "content": "Thanks"},
                                 {"role": "assistant", "content": "You are welcome."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(path), "--data", str(data), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--max-len", "128", "--eval-fraction", "0", "--no-progress",
                 "--device", "cpu"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == family.model
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == family.template
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_command_holds_a_conversation_on_every_family(saved, monkeypatch):
    """`chatsmith chat` (stdin, greedy) keeps the history across turns and renders it with the family's
    template: the second prompt is the first exchange followed by the new user message."""
    from chatsmith.generate.terminal import ChatConfig

    name, path = saved
    cfg = ChatConfig(model=str(path), max_new_tokens=4, temperature=0, device="cpu")
    _, _, seen = run_chat_cli(cfg, "Hi there\nAnd Germany?\n", monkeypatch)
    assert [[m["role"] for m in messages] for messages in seen] == [["user"], ["user", "assistant", "user"]]
    assert seen[1][0]["content"] == "Hi there" and seen[1][2]["content"] == "And Germany?"


# ----------------------------------------------------------------------------- Hub ids

def test_model_source_tells_local_paths_from_hub_ids(tmp_path):
    from chatsmith.model import model_source

    (tmp_path / "owner").mkdir()
    assert model_source(tmp_path / "owner") == (str(tmp_path / "owner"), False)
    for local in ("./owner/name", "/abs/owner/name", "a/b/c", "../name", "owner/"):
        assert model_source(local)[1] is False, local
    for hub in ("Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM3-3B", "gpt2"):
        assert model_source(hub) == (hub, True), hub


def test_a_hub_id_reaches_transformers_and_its_offline_error_is_shown(monkeypatch):
    """No download can happen here (HF_HUB_OFFLINE=1, set in conftest before transformers is imported)."""
    import huggingface_hub.constants
    import transformers

    from chatsmith.errors import ChatsmithError

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    asked = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(name, *args, **kwargs):
        asked.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    with pytest.raises(ChatsmithError) as err:
        load_model("chatsmith-test/no-such-model", device="cpu")
    assert asked == ["chatsmith-test/no-such-model"]
    message = str(err.value)
    assert "model directory not found" not in message
    assert "chatsmith-test/no-such-model" in message and "Hugging Face Hub id" in message
    assert "offline" in message and "couldn't connect" in message.lower()   # transformers' own words


def test_generate_command_takes_a_hub_id(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "chatsmith", "generate", "chatsmith-test/no-such-model", "--prompt",
                           "Hello"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert "model directory not found" not in done.stderr
    assert "chatsmith-test/no-such-model" in done.stderr and "offline" in done.stderr
