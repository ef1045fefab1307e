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


def copies_material(question: str, material: str, n: int = 5) -> bool:
    """Most of the question's word 5-grams appear in the material: the model copied its input."""
    q, m = words(question), words(material)
    grams = {tuple(q[i : i + n]) for i in range(len(q) - n + 1)}
    if not grams:
        return False
    source = {tuple(m[i : i + n]) for i in range(len(m) - n + 1)}
    return len(grams & source) / len(grams) >= 0.5


def parse_question(text: str, max_words: int = 80, material: str = "") -> tuple[str | None, str | None]:
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
    if material and copies_material(body, material):
        return None, "question copies the material"
    return body, None


def parse_response(
    text: str, max_words: int = 250, require_tag: bool = True
) -> tuple[tuple[str, str] | None, str | None]:
    """(analysis, response) from '[Analysis] ... [Response] ...' and its variations.

    With `require_tag` False, a reply with neither tag is taken whole as the response (with no
    analysis); one that starts an analysis but never reaches its response is still dropped."""
    if not text or not text.strip():
        return None, "empty response"
    marker = _RESPONSE.search(text)
    if marker is None and not require_tag and _ANALYSIS.search(text) is None:
        return _checked("", _clean(text), max_words)
    if marker is None:
        return None, "missing [Response]"
    # The response ends where a model that loops starts a new "[Analysis]" / "[Response]" block.
    rest = text[marker.end() :]
    cut = [m.start() for m in (_RESPONSE.search(rest), _ANALYSIS.search(rest)) if m is not None]
    response = _clean(rest[: min(cut)] if cut else rest)
    head = text[: marker.start()]
    analysis_marker = _ANALYSIS.search(head)
    analysis = _clean(head[analysis_marker.end() :] if analysis_marker else head)
    if not response:
        return None, "missing [Response]"
    return _checked(analysis, response, max_words)


def _checked(analysis: str, response: str, max_words: int):
    if not response:
        return None, "empty response"
    if len(words(response)) > max_words:
        return None, "over-long response"
    if is_degenerate(response):
        return None, "degenerate response"
    return (analysis, response), None
