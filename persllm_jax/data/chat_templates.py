"""The options every path that renders a conversation passes to the tokenizer's chat template, so
that training data, generation, probes and the reload check see one rendering."""

from __future__ import annotations

from typing import Any


def template_options(tokenizer) -> dict[str, Any]:
    """Keyword arguments for `apply_chat_template`. Persona replies carry no reasoning, so a template
    that can think (Qwen3's `enable_thinking`) renders with thinking off: its generation prompt then
    ends in an empty `<think>\\n\\n</think>\\n\\n` block, which the model answers after, as in
    Qwen3's non-thinking mode."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(template.values())
    return {"enable_thinking": False} if "enable_thinking" in template else {}
