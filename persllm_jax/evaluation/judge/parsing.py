"""Reading LLM-judge replies that may ignore the requested format.

Weak judges (a 135M model in the demo) answer "**4**", "Score: 4/5", "knowledge question", JSON in code
fences, or chat around the answer. Each parser tries the explicit forms first (JSON, "Label: X"), then looser
ones, and returns None rather than guess when the reply is ambiguous, so the caller can count it as unparsed.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

LABELS = ("knowledge", "attitude", "neither")
SCORE_MIN, SCORE_MAX = 0.0, 5.0

_FENCE = re.compile(r"```(?:[a-zA-Z]+)?\s*(.*?)```", re.DOTALL)
_NUMBER = r"(\d+(?:\.\d+)?)"


def _fenced_or_whole(text: str) -> list[str]:
    """Code-fenced blocks first (where a judge puts its JSON), then the whole reply."""
    return [m.group(1) for m in _FENCE.finditer(text)] + [text]


def _load_structured(chunk: str) -> Any:
    """JSON, or a Python literal (single quotes, True/False), from `chunk`; None if it is neither."""
    chunk = chunk.strip()
    if not chunk:
        return None
    try:
        return json.loads(chunk)
    except (json.JSONDecodeError, ValueError):
        pass
    try:
        return ast.literal_eval(chunk)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def find_structured(text: str) -> list[Any]:
    """Every JSON-like value found in `text`: fenced blocks, the whole reply, then its outermost [..] / {..}."""
    found = []
    for chunk in _fenced_or_whole(text):
        value = _load_structured(chunk)
        if value is not None:
            found.append(value)
            continue
        for open_, close in (("[", "]"), ("{", "}")):
            start, end = chunk.find(open_), chunk.rfind(close)
            if 0 <= start < end:
                value = _load_structured(chunk[start : end + 1])
                if value is not None:
                    found.append(value)
    return found


def _dict_value(obj: Any, keys: Sequence[str]) -> Any:
    if isinstance(obj, dict):
        lowered = {str(k).strip().lower(): v for k, v in obj.items()}
        for key in keys:
            if key in lowered:
                return lowered[key]
    return None


def _clean(text: str) -> str:
    return text.replace("**", "").replace("__", "").strip()


# ----- (a) question classification -----

_LABEL_WORD = re.compile(r"\b(knowledge|attitude|neither)\b", re.IGNORECASE)
_LABEL_MARKER = re.compile(
    r"\b(?:label|category|type|classification|class|answer)\s*(?:is)?\s*[:=\-]?\s*[\"']?\s*"
    r"(knowledge|attitude|neither)\b",
    re.IGNORECASE,
)
_NEGATED = re.compile(r"(?:\bnot|n't)\s+(?:an?\s+|the\s+)?$", re.IGNORECASE)


def _asserted_labels(text: str) -> list[str]:
    """Label words in order, leaving out negated ones ("not an attitude question")."""
    labels = []
    for m in _LABEL_WORD.finditer(text):
        if not _NEGATED.search(text[max(0, m.start() - 12) : m.start()]):
            labels.append(m.group(1).lower())
    return labels


def parse_label(text: str | None) -> str | None:
    """ "knowledge", "attitude" or "neither" from a classification reply; None if absent or ambiguous."""
    if not text:
        return None
    for value in find_structured(text):
        field = _dict_value(value, ("label", "category", "type", "classification", "class", "answer"))
        if isinstance(field, str):
            labels = set(_asserted_labels(field))
            if len(labels) == 1:
                return labels.pop()
    cleaned = _clean(text)
    marker = _LABEL_MARKER.search(cleaned)
    if marker:
        return marker.group(1).lower()
    labels = _asserted_labels(cleaned)
    if len(set(labels)) == 1:
        return labels[0]
    if cleaned.lower().strip(" .\"'") == "none":
        return "neither"
    # The reply names several labels (e.g. it repeats the options): trust only a first line naming one.
    first_line = next((line for line in cleaned.splitlines() if line.strip()), "")
    first = set(_asserted_labels(first_line))
    return first.pop() if len(first) == 1 else None


# ----- (b) 0-5 score -----

_SCORE_MARKER = re.compile(
    r"\b(?:score|rating|grade|mark)\s*(?:is|of)?\s*[:=\-]?\s*" + _NUMBER + r"(?!\d)", re.IGNORECASE
)
_OUT_OF_FIVE = re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*5(?![\d.]\d)", re.IGNORECASE)
_BOLD_NUMBER = re.compile(r"\*\*\s*" + _NUMBER + r"\s*\*\*")
_ONLY_NUMBER = re.compile(r"^\W*" + _NUMBER + r"\W*$")
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER + r"(?![\w]|\.\d)")
# The scale itself ("(0-5)", "from 0 to 5") when a judge repeats the prompt: its digits are not a score.
_SCALE_ECHO = re.compile(r"\(?\b(?:from\s+)?0\s*(?:-|–|to|\.\.)\s*5\b\)?|\bfrom\s+0\b", re.IGNORECASE)


def _in_range(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if SCORE_MIN <= number <= SCORE_MAX else None


def parse_score(text: str | None) -> float | None:
    """A 0-5 score from a grading reply; None if there is none, it is out of range, or several compete."""
    if not text:
        return None
    for value in find_structured(text):
        field = _dict_value(value, ("score", "rating", "grade", "mark"))
        if field is not None and not isinstance(field, bool):
            return _in_range(field)
    cleaned = _SCALE_ECHO.sub(" ", _clean(text))
    for pattern, where in ((_SCORE_MARKER, cleaned), (_OUT_OF_FIVE, cleaned), (_BOLD_NUMBER, text)):
        m = pattern.search(where)
        if m:
            return _in_range(m.group(1))
    m = _ONLY_NUMBER.match(cleaned)
    if m:
        return _in_range(m.group(1))
    numbers = {float(n) for n in _ANY_NUMBER.findall(cleaned)}
    if len(numbers) == 1:
        return _in_range(numbers.pop())
    return None


# ----- (c) yes / no -----

_YES, _NO = {"yes", "true", "y"}, {"no", "false", "n"}
_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_YES_NO_MARKER = re.compile(
    r"\b(?:answer|verdict|judgment|judgement|result)\s*(?:is)?\s*[:=\-]?\s*[\"']?(yes|no)\b", re.IGNORECASE
)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower().strip(".!\"' ")
        if word in _YES:
            return True
        if word in _NO:
            return False
    return None


def parse_yes_no(text: str | None) -> bool | None:
    """True for yes, False for no; None if the reply commits to neither (or to both)."""
    if not text:
        return None
    for value in find_structured(text):
        verdict = _as_bool(_dict_value(value, ("answer", "verdict", "result", "rejects_premise", "judgment")))
        if verdict is not None:
            return verdict
    cleaned = _clean(text)
    m = _YES_NO_MARKER.search(cleaned)
    if m:
        return m.group(1).lower() == "yes"
    first_word = re.match(r"^\W*(\w+)", cleaned)
    if first_word:
        verdict = _as_bool(first_word.group(1))
        if verdict is not None:
            return verdict
    words = {w.lower() for w in _YES_NO_WORD.findall(cleaned)}
    if len(words) == 1:
        return words.pop() == "yes"
    return None


# ----- (d) ranking -----

_LETTER_IN = re.compile(r"(?:^|\b(?:answer|model|assistant|response)\s*)([A-Za-z])\s*$", re.IGNORECASE)
_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_OBJ_MODEL = re.compile(
    r"[\"']?(?:model|answer|assistant|id|name)[\"']?\s*:\s*[\"']?(?:answer\s+|model\s+)?([A-Za-z])\b",
    re.IGNORECASE,
)
_OBJ_RANK = re.compile(r"[\"']?(?:rank|position|place)[\"']?\s*:\s*[\"']?(\d+)", re.IGNORECASE)
_OBJ_REASON = re.compile(r"[\"']?reason[\"']?\s*:\s*[\"']((?:[^\"'\\]|\\.)*)", re.IGNORECASE)
_LINE_LETTER_RANK = re.compile(
    r"^\W*(?:answer|model|assistant|response)?\s*([A-Z])\s*[:=\-)]\s*(?:rank(?:ed)?\s*)?[:#]?\s*(\d+)\b",
    re.IGNORECASE,
)
_LINE_RANK_LETTER = re.compile(
    r"^\W*(?:rank\s*)?(\d+)\s*[:.)\-]\s*(?:answer|model|assistant|response)?\s*([A-Z])\s*(?:$|[:\-,(])",
    re.IGNORECASE,
)


def _letter(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    m = _LETTER_IN.search(value.strip().strip("\"'*. "))
    return m.group(1).upper() if m else None


def _rank(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.search(r"\d+", value)
        return int(m.group()) if m else None
    return None


def _entries_from_value(value: Any) -> list[tuple[str | None, int | None, str]]:
    """(letter, rank, reason) entries from a parsed JSON value in any of the shapes judges produce."""
    if isinstance(value, dict):
        nested = _dict_value(value, ("ranking", "rankings", "ranks", "results", "answers"))
        if isinstance(nested, (list, dict)):
            return _entries_from_value(nested)
        if _dict_value(value, ("model", "answer", "rank")) is not None:
            value = [value]
        else:  # {"A": 1, "B": 2} or {"A": {"rank": 1, "reason": ...}}
            entries = []
            for key, item in value.items():
                if isinstance(item, dict):
                    reason = _dict_value(item, ("reason",))
                    entries.append((_letter(key), _rank(_dict_value(item, ("rank",))), str(reason or "")))
                else:
                    entries.append((_letter(key), _rank(item), ""))
            return entries
    if not isinstance(value, list):
        return []
    entries = []
    for item in value:
        if not isinstance(item, dict):
            continue
        letter = _letter(_dict_value(item, ("model", "answer", "assistant", "id", "name")))
        rank = _rank(_dict_value(item, ("rank", "position", "place")))
        reason = _dict_value(item, ("reason", "reasoning", "explanation"))
        entries.append((letter, rank, str(reason) if reason is not None else ""))
    return entries


def _entries_from_objects(text: str) -> list[tuple[str | None, int | None, str]]:
    """Entries from {...} chunks one by one, for JSON that is broken or cut off by max_tokens."""
    entries = []
    for chunk in _OBJECT.findall(text):
        model, rank = _OBJ_MODEL.search(chunk), _OBJ_RANK.search(chunk)
        if model and rank:
            reason = _OBJ_REASON.search(chunk)
            entries.append((model.group(1).upper(), int(rank.group(1)), reason.group(1) if reason else ""))
    return entries


def _entries_from_lines(text: str) -> list[tuple[str | None, int | None, str]]:
    entries = []
    for line in _clean(text).splitlines():
        m = _LINE_LETTER_RANK.match(line)
        if m:
            entries.append((m.group(1).upper(), int(m.group(2)), ""))
            continue
        m = _LINE_RANK_LETTER.match(line)
        if m:
            entries.append((m.group(2).upper(), int(m.group(1)), ""))
    return entries


def _complete_ranking(entries, letters: Sequence[str]) -> list[dict] | None:
    """The ranking if every letter has exactly one rank in 1..len(letters) (ties allowed); else None."""
    n = len(letters)
    ranks: dict[str, tuple[int, str]] = {}
    for letter, rank, reason in entries:
        if letter not in letters:
            continue  # a letter no answer has: chatter, not a ranking entry
        if rank is None or not 1 <= rank <= n:
            return None
        if letter in ranks and ranks[letter][0] != rank:
            return None
        ranks.setdefault(letter, (rank, reason))
    if set(ranks) != set(letters):
        return None
    return [{"model": letter, "reason": ranks[letter][1], "rank": ranks[letter][0]} for letter in letters]


def parse_ranking(text: str | None, letters: Sequence[str]) -> list[dict] | None:
    """[{model: letter, reason, rank}] covering every letter in `letters`, or None.

    Tries a JSON list/dict (also inside code fences), then {...} objects one by one, then lines such as
    "A: 1", "Answer B - rank 2" or "1. C".
    """
    if not text:
        return None
    letters = [letter.upper() for letter in letters]
    for value in find_structured(text):
        ranking = _complete_ranking(_entries_from_value(value), letters)
        if ranking is not None:
            return ranking
    for extract in (_entries_from_objects, _entries_from_lines):
        ranking = _complete_ranking(extract(text), letters)
        if ranking is not None:
            return ranking
    return None
