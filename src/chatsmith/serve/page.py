"""The web page served at `GET /`: `page.html` beside this file (package data), plain HTML/CSS/JS, no build
step, nothing fetched from anywhere but this server.

Three modes, chosen by the URL's fragment (tabs at the top):
- `#chat`: a chat with streamed replies (`POST /v1/chat/completions`, server-sent events read with `fetch`
  and a stream reader), a system prompt, model picker, temperature, new conversation.
- `#compare`: each message is answered twice, by two models or two samples of one, side by side; the sides
  are shuffled and their models hidden until the person judges: A, B, tie or both bad, optionally with a
  better reply written in. The judgment goes to `POST /v1/feedback` (`serve --feedback DB`), then the
  models are shown and the conversation goes on with the better reply.
- `#label`: the pairs `chatsmith rlhf --labeler human` queued (`GET /v1/feedback/pairs`), judged one by one
  in the same view.
The conversations, settings and API key live in the browser's localStorage, so a reload keeps them.

Tests: `python -m pytest tests/test_serve.py tests/test_browser.py -q`.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["page_html"]


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page's HTML (read once from the package)."""
    return resources.files("chatsmith.serve").joinpath("page.html").read_text(encoding="utf-8")
