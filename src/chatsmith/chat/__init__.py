"""Chat templates and exact assistant-only masks (see `templates.py` and `render.py`).

    from chatsmith.chat import get_format, render_chat, render_prompt
"""

from chatsmith.chat.render import RenderedChat, render_chat, render_prompt
from chatsmith.chat.templates import (BUILTIN_SPECIAL_TOKENS, BUILTIN_TEMPLATES, ChatFormat, compile_template,
                                      get_format, missing_special_tokens)

__all__ = ["BUILTIN_SPECIAL_TOKENS", "BUILTIN_TEMPLATES", "ChatFormat", "RenderedChat", "compile_template",
           "get_format", "missing_special_tokens", "render_chat", "render_prompt"]
