"""The web page in a real browser: Playwright driving Debian's Chromium headless (`apt-get install chromium`,
launched by its path; `playwright install` is never needed) against a real `chatsmith serve` on 127.0.0.1
with two tiny models and a feedback database.

    python -m pytest tests/test_browser.py -q
    CHATSMITH_SCREENSHOT=docs/images/web-chat.png python -m pytest tests/test_browser.py -q   # the README's picture

The test saves a screenshot of compare mode under its tmp_path; with CHATSMITH_SCREENSHOT=PATH it also saves
the README's picture there: label mode over the queued pairs (readable text; the tiny models' own replies
are noise).

Chat: type a message, the streamed reply appears and equals the API's own greedy reply, a reload keeps the
conversation. Compare: the same message answered by both models side by side, pick A, the judgment is a row
in SQLite with the two replies and models. Label: a pair queued in the database is shown and judged.
Without Chromium or Playwright the test is skipped with the reason, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest

from chatsmith.serve.cli import ServeConfig, build_app
from chatsmith.serve.feedback import FeedbackStore, Pair
from servers import running, tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM = "/usr/bin/chromium"
MESSAGE = "What is the capital of France?"


def browser_or_skip() -> str:
    """Chromium's path; a skip with the reason when it or Playwright is missing (a failure in CI)."""
    missing = []
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing.append(f"Chromium ({CHROMIUM}; install it with `apt-get install -y chromium`)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " - CI must run it")
        pytest.skip(reason)
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


def set_value(page, selector: str, value: str) -> None:
    page.locator(selector).fill(value)
    page.locator(selector).dispatch_event("change")


def chat_page(browser, url: str, n_models: int):
    """The page's chat view once its `n_models` models are listed, greedy, 16 tokens a reply."""
    page = browser.new_page(viewport={"width": 1180, "height": 760})
    page.set_default_timeout(60_000)
    page.goto(url + "/#chat")
    page.wait_for_function(f"document.querySelectorAll('#model option').length === {n_models}")
    set_value(page, "#temperature", "0")
    set_value(page, "#max_tokens", "16")
    return page


def ask(page, url: str, model: str, shown: str) -> dict:
    """Send MESSAGE in the chat view, wait until the JavaScript condition `shown` holds and the reply is
    done, and return the API's own greedy answer to it (its message)."""
    page.fill("#input", MESSAGE)
    page.press("#input", "Enter")
    page.wait_for_function(f"({shown}) && !document.getElementById('send').disabled")
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 16,
        "temperature": 0}).json()["choices"][0]["message"]


QUEUED = [  # (question, response A, response B): pairs `chatsmith rlhf --labeler human` could have queued
    ("What is the capital of France?", "The capital of France is Paris.",
     "France is a country in Europe. Its capital is Lyon, I think."),
    ("Write a haiku about the sea.", "Grey waves fold and break\nsalt wind combing the long shore\nthe tide keeps its time",
     "The sea is big and blue. I like the sea."),
    ("Is Java an island?", "Yes: Java is an island of Indonesia (and also a programming language).", "No."),
]


def test_chat_compare_and_label_in_chromium(tmp_path, monkeypatch):
    executable = browser_or_skip()
    from playwright.sync_api import sync_playwright

    readme_shot = os.environ.get("CHATSMITH_SCREENSHOT")
    readme_shot = Path(readme_shot).resolve() if readme_shot else None
    monkeypatch.chdir(tmp_path)         # the models are served under their paths as given: short ids
    models = [str(tiny_chat_model(Path("runs") / name, seed=seed)) for name, seed in (("sft", 0), ("ppo", 1))]
    db = tmp_path / "feedback.db"
    app = build_app(ServeConfig(models=models, device="cpu", feedback=str(db), max_new_tokens=64))
    queued = FeedbackStore(db)          # what `chatsmith rlhf --labeler human` does: pairs wait for people
    pair_ids = queued.queue_pairs([Pair(batch="test", prompt=[{"role": "user", "content": q}], response_a=a,
                                        response_b=b, model_a=models[0], model_b=models[0]) for q, a, b in QUEUED])
    queued.close()
    with running(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = chat_page(browser, url, n_models=2)

            # chat: the streamed reply appears and equals the API's greedy reply
            expected = ask(page, url, models[0], "document.querySelector('#log .msg.assistant .body') && "
                           "document.querySelector('#log .msg.assistant .body').textContent.length > 0")["content"]
            shown = page.inner_text("#log .msg.assistant .body")
            assert shown == expected.strip() or shown == expected
            page.reload()                                       # the conversation survives a reload
            page.wait_for_selector("#log .msg.assistant")
            assert page.inner_text("#log .msg.user .body") == MESSAGE

            # compare: both models answer side by side, blinded; pick A
            page.click("#tab-compare")
            page.wait_for_selector("#view-compare.active")
            page.select_option("#model_1", models[0])
            page.select_option("#model_2", models[1])
            page.fill("#cinput", MESSAGE)
            page.press("#cinput", "Enter")
            page.wait_for_selector('#clog button[data-choice="a"]:not([disabled])')
            side_a = page.inner_text('#clog .side[data-side="a"] .text')
            side_b = page.inner_text('#clog .side[data-side="b"] .text')
            page.click('#clog button[data-choice="a"]')
            page.wait_for_selector("#clog .status.ok")
            assert "Saved judgment #1" in page.inner_text("#clog .status.ok")
            shot = tmp_path / "web-chat.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000

            with sqlite3.connect(db) as conn:
                rows = conn.execute("SELECT prompt, response_a, response_b, model_a, model_b, choice "
                                    "FROM judgments").fetchall()
            assert len(rows) == 1
            prompt, response_a, response_b, model_a, model_b, choice = rows[0]
            assert choice == "a" and {model_a, model_b} == set(models)
            assert (response_a.strip(), response_b.strip()) == (side_a.strip(), side_b.strip())
            assert '"content": "%s"' % MESSAGE in prompt

            # label: the queued pairs are shown one by one and judged
            page.click("#tab-label")
            page.wait_for_selector('#llog button[data-choice="b"]:not([disabled])')
            assert page.inner_text('#llog .side[data-side="a"] .text') == QUEUED[0][1]
            assert "3 pairs wait" in page.inner_text("#lcount")
            if readme_shot:
                readme_shot.parent.mkdir(parents=True, exist_ok=True)
                page.fill("#llog .better", "Paris is the capital of France.")
                page.set_viewport_size({"width": 1100, "height": 440})
                page.screenshot(path=str(readme_shot))
            page.click('#llog button[data-choice="b"]')
            page.wait_for_selector("#llog .status.ok")
            page.wait_for_function("document.getElementById('lcount').textContent.startsWith('2 pairs wait')")
            assert page.inner_text('#llog .side[data-side="a"] .text') == QUEUED[1][1]
        finally:
            browser.close()
    with sqlite3.connect(db) as conn:
        judged = conn.execute("SELECT p.id, j.choice, j.response_b, j.edited FROM pairs p JOIN judgments j "
                              "ON j.id = p.judgment").fetchall()
    edited = "Paris is the capital of France." if readme_shot else None
    assert judged == [(pair_ids[0], "b", QUEUED[0][2], edited)]


def test_thinking_is_shown_apart_from_the_reply_in_chromium(tmp_path, monkeypatch):
    """A model whose generation prompt opens a think block: the page shows the streamed `reasoning_content`
    above the reply, muted, and the reply alone as the answer (both equal to the API's own greedy answer)."""
    executable = browser_or_skip()
    from playwright.sync_api import sync_playwright

    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    monkeypatch.chdir(tmp_path)
    model = str(tiny_chat_model(Path("runs") / "thinker"))
    app = build_app(ServeConfig(models=[model], device="cpu", template=template, max_new_tokens=64))
    with running(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = chat_page(browser, url, n_models=1)
            expected = ask(page, url, model, "document.querySelector('#log .msg.assistant .thinking')")
            assert expected["reasoning_content"]
            assert page.inner_text("#log .msg.assistant .thinking") == expected["reasoning_content"].strip()
            assert page.inner_text("#log .msg.assistant .body") == expected["content"].strip()
        finally:
            browser.close()
