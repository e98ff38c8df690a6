"""Tool-call parsers, one per model family, chosen by name (`--tool-call-parser`); `auto` reads the model's
chat template to pick one."""

from __future__ import annotations

from gateway.tool_parsers.base import ToolParser
from gateway.tool_parsers.hermes import HermesParser
from gateway.tool_parsers.llama3_json import Llama3JsonParser

PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}
PARSER_NAMES = ("auto", "none", *PARSERS)


def detect(chat_template) -> str:
    """The parser a chat template's own tool-call format needs: `none` when it shows no known format."""
    if isinstance(chat_template, dict):  # several named templates
        chat_template = " ".join(chat_template.values())
    elif isinstance(chat_template, list):  # [{"name", "template"}, ...]
        chat_template = " ".join(t.get("template", "") for t in chat_template if isinstance(t, dict))
    text = chat_template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "<|python_tag|>" in text or ('"parameters"' in text and "tools" in text):
        return "llama3_json"
    return "none"


def model_parser(name: str, chat_template) -> ToolParser | None:
    """The parser called `name` (`auto`: detected from chat_template); None for `none`."""
    if name not in PARSER_NAMES:
        raise ValueError(f"tool_call_parser must be one of {', '.join(PARSER_NAMES)}, got {name!r}")
    if name == "auto":
        name = detect(chat_template)
    return PARSERS[name]() if name in PARSERS else None
