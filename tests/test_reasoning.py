"""Reasoning before a reply (chat/reasoning.py): folding `reasoning_content` into training text, and splitting
generated text, whole or streamed, into reasoning and reply.

Run: `python -m pytest tests/test_reasoning.py -q`
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chatsmith.chat.reasoning import ReasoningSplitter, fold_reasoning, opens_reasoning, split_reasoning


def test_split_reasoning_of_a_whole_reply():
    assert split_reasoning("<think>\nIs it okay? No.\n</think>\n\nI can't help.") == ("Is it okay? No.",
                                                                                 "I can't help.")
    assert split_reasoning("Paris.") == (None, "Paris.")
    assert split_reasoning("The tag <think> mid-reply is text.") == (None, "The tag <think> mid-reply is text.")
    assert split_reasoning("<think>\nstill thinking when the budget ran out") == (
        "still thinking when the budget ran out", "")
    # DeepSeek-R1's generation prompt opens the block: the reply starts inside it
    assert opens_reasoning("<｜Assistant｜><think>\n") and not opens_reasoning("<|im_start|>assistant\n")
    assert split_reasoning("Think first.\n</think>\n\nParis.", started=True) == ("Think first.", "Paris.")


def test_fold_reasoning_only_where_the_template_does_not_read_it():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "\nA greeting.\n"}]
    folded = fold_reasoning(messages, "{{ message.content }}")
    assert folded[1] == {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"}
    assert messages[1]["reasoning_content"] == "\nA greeting.\n"        # the caller's rows are not changed
    assert fold_reasoning(messages, "{{ message.reasoning_content }}") is messages
    empty = [{"role": "assistant", "content": "Hello!", "reasoning_content": ""}]
    assert fold_reasoning(empty, "{{ message.content }}") == [{"role": "assistant", "content": "Hello!"}]


_PIECES = st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "No.", "Yes",
                                    "Paris", "<th", "ink>", "</thi"]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(parts=_PIECES, cuts=st.lists(st.integers(1, 5), min_size=1, max_size=40), started=st.booleans())
def test_streamed_split_equals_the_whole_split(parts, cuts, started):
    """However the text arrives, the streamed parts join to `split_reasoning`'s result, and no part ever
    holds half a tag."""
    text = "".join(parts)
    splitter, out, at, k = ReasoningSplitter(started), [], 0, 0
    while at < len(text):
        piece = text[at:at + cuts[k % len(cuts)]]
        out += splitter.feed(piece)
        at, k = at + len(piece), k + 1
    out += splitter.finish()
    reasoning, content = split_reasoning(text, started)
    streamed_reasoning = "".join(t for kind, t in out if kind == "reasoning")
    assert "".join(t for kind, t in out if kind == "content") == content
    assert streamed_reasoning == (reasoning or "")
    assert all(t for _, t in out)
