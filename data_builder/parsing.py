"""Parsing annotator output, tolerant of the formatting variations real models produce, and the
quality filters. Each parser returns (value, None) or (None, drop reason)."""

from __future__ import annotations

import re

# "[Response]", "[RESPONSE]:", "**Response**:", "**Response:**", "### Response", "Response:" at a
# line start. A bare word "response" inside a sentence is not a marker.
_MARKER = (
    r"\[\s*{name}\s*\]\s*[:\-]?"
    r"|\*\*\s*{name}\s*:?\s*\*\*\s*:?"
    r"|^[ \t]*#+[ \t]*{name}[ \t]*:?"
    r"|^[ \t]*{name}[ \t]*:"
)
_ANALYSIS = re.compile(_MARKER.format(name="analysis"), re.IGNORECASE | re.MULTILINE)
_RESPONSE = re.compile(_MARKER.format(name="response"), re.IGNORECASE | re.MULTILINE)
_INPUT_PREFIX = re.compile(
    r"^\s*[\[\(*#]*\s*(?:input|question|opinion|user)\s*[\]\)*]*\s*[:\-]\s*[\]\)*]*\s*", re.IGNORECASE
)
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_degenerate(text: str, min_words: int = 12) -> bool:
    """Looping output: few distinct word trigrams, or one line said three times or more."""
    tokens = words(text)
    if len(tokens) >= min_words:
        trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
        if len(set(trigrams)) / len(trigrams) < 0.5:
            return True
    lines = [line.strip().lower() for line in text.splitlines() if len(line.strip()) > 10]
    return any(lines.count(line) >= 3 for line in set(lines))


def _clean(text: str) -> str:
    text = text.strip().strip('"“”').strip()
    return re.sub(r"[ \t]+", " ", text)


def parse_question(text: str, max_words: int = 80) -> tuple[str | None, str | None]:
    """The generated input: the text after an optional 'Input:' label, first paragraph only."""
    if not text or not text.strip():
        return None, "empty question"
    body = _INPUT_PREFIX.sub("", text.strip(), count=1)
    body = re.split(r"\n\s*\n", body.strip())[0]
    body = _clean(" ".join(line.strip() for line in body.splitlines()))
    body = _INPUT_PREFIX.sub("", body, count=1)
    count = len(words(body))
    if count < 3:
        return None, "question too short"
    if count > max_words:
        return None, "question too long"
    if is_degenerate(body):
        return None, "degenerate question"
    return body, None


def parse_response(text: str, max_words: int = 250) -> tuple[tuple[str, str] | None, str | None]:
    """(analysis, response) from '[Analysis] ... [Response] ...' and its variations."""
    if not text or not text.strip():
        return None, "empty response"
    found = list(_RESPONSE.finditer(text))
    if not found:
        return None, "missing [Response]"
    marker = found[-1]  # the last one: models sometimes mention "response" in the analysis
    response = _clean(text[marker.end() :])
    head = text[: marker.start()]
    analysis_marker = _ANALYSIS.search(head)
    analysis = _clean(head[analysis_marker.end() :] if analysis_marker else head)
    if not response:
        return None, "missing [Response]"
    if len(words(response)) > max_words:
        return None, "over-long response"
    if is_degenerate(response):
        return None, "degenerate response"
    return (analysis, response), None
