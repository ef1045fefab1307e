"""The judge's requests: prompt templates and rubrics, the message builders of the four judging steps,
the sampling and size limits every request is sent with, and the seeded anonymisation that hides which
model wrote which answer behind a letter when the judge ranks them.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Mapping, Sequence

SYSTEM_PROMPT = "You are a careful, impartial evaluator of role-playing chatbots. Follow the output format."

CLASSIFY_PROMPT = """\
Classify this test question for a chatbot that plays {character}.

Question: {question}
Reference answer by {character}: {reference}

Categories:
- Knowledge question: asks about facts, events, people, places or skills that {character} knows.
- Attitude question: asks for {character}'s opinion, feelings, values or stance on something.
- Neither: small talk or anything else.

Reply with only the category name: Knowledge question, Attitude question, or Neither."""

KNOWLEDGE_RUBRIC = """\
Does the chatbot answer contain the same knowledge as the reference answer?
5 = the same knowledge: the facts of the reference are all there and correct
4 = mostly the same knowledge, a minor detail missing or vague
3 = partly the same, some important facts missing
2 = little of the reference's knowledge
1 = no relevant knowledge (evasive or off topic)
0 = conflicting: it states facts that contradict the reference"""

ATTITUDE_RUBRIC = """\
Does the chatbot answer hold the same attitude (opinion, feeling, stance) as the reference answer?
5 = the same attitude, for the same reasons
4 = the same attitude, reasons differ a little
3 = a similar but weaker or vaguer attitude
2 = a mostly different attitude
1 = no attitude expressed
0 = conflicting: the opposite attitude to the reference"""

SCORE_PROMPT = """\
A chatbot plays {character}. Rate from 0 to 5 how well its answer matches the reference answer written \
as {character}.
{rubric}

Question: {question}
Reference answer: {reference}
Chatbot answer: {answer}

Score (0-5):"""

INDUCTION_PROMPT = """\
A chatbot plays {character}. The question below contains a false premise: it assumes something about \
{character} that is not true. The reference answer shows how {character} rejects it.

Question: {question}
Reference answer: {reference}
Chatbot answer: {answer}

Does the chatbot answer point out or reject the false premise, instead of playing along with it?
Reply with only Yes or No."""

RANKING_PROMPT = """\
Several chatbots play {character}. Rank their answers to the same question by how close each is to the \
reference answer in knowledge accuracy, attitude and speaking style. Rank 1 is the best; answers of equal \
quality may share a rank.

Question: {question}
Reference answer: {reference}

{answers}

Reply with only a JSON list with one object per answer, for example:
[{example}]
Ranking (JSON):"""

ANSWER_BLOCK = "Answer {letter}: {answer}"
CLIP_MARK = " [...]"


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """Sampling and size limits of judge requests (they are part of every cache key)."""

    temperature: float = 0.0
    seed: int | None = 0
    label_max_tokens: int = 32
    score_max_tokens: int = 32
    yes_no_max_tokens: int = 16
    rank_max_tokens: int = 512
    max_answer_chars: int = 2000  # longer answers and references are clipped so prompts stay bounded
    rank_seed: int = 0  # seeds the letter order of each ranked item


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + CLIP_MARK


def _messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def classify_messages(item: Mapping, character: str, settings: JudgeSettings = JudgeSettings()) -> list[dict]:
    """Step (a) request for one test item."""
    return _messages(
        CLASSIFY_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
        )
    )


def score_messages(
    item: Mapping, answer: str, label: str, character: str, settings: JudgeSettings = JudgeSettings()
) -> list[dict]:
    """Step (b) request: `label` ("knowledge" or "attitude") picks the rubric."""
    rubric = {"knowledge": KNOWLEDGE_RUBRIC, "attitude": ATTITUDE_RUBRIC}[label]
    return _messages(
        SCORE_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
            answer=_clip(answer, settings.max_answer_chars),
            rubric=rubric,
        )
    )


def induction_messages(
    item: Mapping, answer: str, character: str, settings: JudgeSettings = JudgeSettings()
) -> list[dict]:
    """Step (c) request for one answer to an induced (false-premise) question."""
    return _messages(
        INDUCTION_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
            answer=_clip(answer, settings.max_answer_chars),
        )
    )


def anonymize(models: Sequence[str], item_id: str, seed: int = 0) -> dict[str, str]:
    """letter -> model for one item: a shuffle seeded by (seed, item_id), the same on every run."""
    if len(models) > len(string.ascii_uppercase):
        raise ValueError(f"can rank at most {len(string.ascii_uppercase)} models at once, got {len(models)}")
    shuffled = list(models)
    random.Random(f"{seed}/{item_id}").shuffle(shuffled)
    return dict(zip(string.ascii_uppercase, shuffled))


def ranking_messages(
    item: Mapping, answers: Mapping[str, str], character: str, settings: JudgeSettings = JudgeSettings()
) -> list[dict]:
    """Step (d) request; `answers` maps letter -> answer text, in letter order."""
    blocks = "\n\n".join(
        ANSWER_BLOCK.format(letter=letter, answer=_clip(text, settings.max_answer_chars))
        for letter, text in answers.items()
    )
    example = ", ".join(f'{{"model": "{letter}", "reason": "...", "rank": N}}' for letter in answers)
    return _messages(
        RANKING_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
            answers=blocks,
            example=example,
        )
    )
