"""Probes are evaluation data: no question of the shipped probe sets (both of each persona's) may be
a user turn of data a model trains on."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def probe_questions() -> set[str]:
    questions = set()
    for path in sorted((ROOT / "examples" / "personas").glob("*/probes*.jsonl")):
        questions |= {
            normalise(json.loads(line)["question"]) for line in path.read_text().splitlines() if line
        }
    return questions


def user_turns(records) -> list[str]:
    """Every user turn of dialogue records (`messages`) and preference pairs (`prompt`)."""
    turns = []
    for record in records:
        for key in ("messages", "prompt"):
            value = record.get(key)
            if isinstance(value, list):
                turns += [m["content"] for m in value if m.get("role") == "user"]
            elif isinstance(value, str) and key == "prompt":
                turns.append(value)
    return turns


def assert_no_probe_question_in(records) -> None:
    questions = probe_questions()
    assert len(questions) >= 250  # both sets of the three personas
    turns = user_turns(records)
    assert turns, "no user turn to check"
    leaked = sorted({q for t in turns for q in questions if q in normalise(t)})
    assert not leaked, f"probe questions in training data: {leaked[:5]}"
