"""Judge prompts and reply parsers on fixed strings (the replies a weak or a strong judge writes)."""

import pytest

from persllm_jax.evaluation.judge.aggregate import count_parsed, summarize_induction, summarize_scores
from persllm_jax.evaluation.judge.parsing import parse_label, parse_ranking, parse_score, parse_yes_no
from persllm_jax.evaluation.judge.procedure import parse_model_ranking
from persllm_jax.evaluation.judge.prompts import (
    ATTITUDE_RUBRIC,
    KNOWLEDGE_RUBRIC,
    JudgeSettings,
    anonymize,
    classify_messages,
    induction_messages,
    ranking_messages,
    score_messages,
)

ITEM = {
    "item_id": "holmes-early-3",
    "persona": "holmes",
    "stage": "early",
    "kind": "induced",
    "question": "Why did you retire to Kent to keep pigs?",
    "reference": "Pigs? Kent? You are misinformed: I have not retired, and when I do it will be bees in Sussex.",
}


@pytest.mark.parametrize(
    "reply, label",
    [
        ("Knowledge question", "knowledge"),
        ("knowledge", "knowledge"),
        ("**Attitude question**", "attitude"),
        ("Neither.", "neither"),
        ("None", "neither"),
        ("Category: Attitude question", "attitude"),
        ('```json\n{"label": "Knowledge question"}\n```', "knowledge"),
        ("{'category': 'neither'}", "neither"),
        ("This is a knowledge question, not an attitude question.", "knowledge"),
        ("The question asks about his opinion, so it is an Attitude question.", "attitude"),
        ("Knowledge question\n\nIt could also be read as an attitude question.", "knowledge"),
        ("Knowledge question / Attitude question / Neither", None),  # echoes the options
        ("I am not sure what you mean.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_label(reply, label):
    assert parse_label(reply) == label


@pytest.mark.parametrize(
    "reply, score",
    [
        ("Score: 4", 4.0),
        ("score:3", 3.0),
        ("Score: **5**", 5.0),
        ("4/5", 4.0),
        ("I would give it 2 out of 5.", 2.0),
        ("**4**", 4.0),
        ("0", 0.0),
        ("3.5", 3.5),
        ("Rating: 1 - the answer is evasive.", 1.0),
        ('```json\n{"score": 2, "reason": "few facts"}\n```', 2.0),
        ('{"Score": "5"}', 5.0),
        ("The answer mentions Baker Street, so 4.", 4.0),
        ("Score (0-5): 4", 4.0),
        ("On a scale from 0 to 5, I give it 3.", 3.0),
        ("A chatbot plays Sherlock Holmes. Rate from 0", None),  # an echo of the prompt, not a score
        ("Score: 7", None),  # out of range is not silently clipped
        ("8/10", None),
        ("In 1881 he had 2 rooms.", None),  # two numbers, no marker: ambiguous
        ("The answer is good.", None),
        ("", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Yes", True),
        ("yes.", True),
        ("No", False),
        ("**No**, it plays along with the premise.", False),
        ("Yes, it points out that he never lived in Kent.", True),
        ("Answer: no", False),
        ('{"answer": "Yes"}', True),
        ('```json\n{"rejects_premise": false}\n```', False),
        ("The chatbot clearly says yes to the premise? No.", None),  # both words, no marker
        ("It does point out the error.", None),
        ("", None),
    ],
)
def test_parse_yes_no(reply, verdict):
    assert parse_yes_no(reply) is verdict


@pytest.mark.parametrize(
    "reply, ranks",
    [
        (
            '[{"model": "A", "reason": "closest", "rank": 1}, {"model": "B", "reason": "off", "rank": 2}]',
            {"A": 1, "B": 2},
        ),
        (
            '```json\n[{"model": "B", "reason": "x", "rank": 1},\n {"model": "A", "reason": "y", "rank": 1}]\n```',
            {"A": 1, "B": 1},
        ),
        (
            'Here is my ranking:\n[{"model": "Answer A", "rank": "2"}, {"model": "Answer B", "rank": "1"}]',
            {"A": 2, "B": 1},
        ),
        ('{"A": 2, "B": 1}', {"A": 2, "B": 1}),
        ('{"ranking": [{"model": "a", "rank": 1}, {"model": "b", "rank": 2}]}', {"A": 1, "B": 2}),
        (
            "[{'model': 'A', 'reason': 'ok', 'rank': 2}, {'model': 'B', 'reason': 'ok', 'rank': 1}]",
            {"A": 2, "B": 1},
        ),
        ('[{"model": "A", "reason": "good", "rank": 1}, {"model": "B", "reason": "cut off by max_tok', None),
        (
            '[{"model": "A", "reason": "good", "rank": 1}, {"model": "B", "reason": "ok", "rank": 2}, {"model": "B", "rea',
            {"A": 1, "B": 2},
        ),
        ("A: 1\nB: 2", {"A": 1, "B": 2}),
        ("Answer A - rank 2\nAnswer B - rank 1", {"A": 2, "B": 1}),
        ("1. B\n2. A", {"A": 2, "B": 1}),
        ("A: 1", None),  # B is missing
        ("A: 1\nB: 3", None),  # rank out of 1..2
        ("A: 1\nA: 2\nB: 1", None),  # contradicts itself
        ("A good answer is hard to find.", None),
        ("", None),
    ],
)
def test_parse_ranking(reply, ranks):
    parsed = parse_ranking(reply, ["A", "B"])
    if ranks is None:
        assert parsed is None
    else:
        assert {e["model"]: e["rank"] for e in parsed} == ranks
        assert parsed, "nothing to check"
        assert all(set(e) == {"model", "reason", "rank"} for e in parsed)


def test_ranking_reasons_are_kept_and_letters_mapped_back():
    reply = '[{"model": "A", "reason": "knows Baker Street", "rank": 1}, {"model": "B", "reason": "vague", "rank": 2}]'
    entries = parse_model_ranking(reply, {"A": "dpo", "B": "base"})
    assert entries == [
        {"model": "dpo", "reason": "knows Baker Street", "rank": 1},
        {"model": "base", "reason": "vague", "rank": 2},
    ]
    assert parse_model_ranking("nonsense", {"A": "dpo", "B": "base"}) is None


def test_anonymize_is_seeded_and_varies_by_item():
    models = ["base", "sft", "dpo"]
    first = anonymize(models, "item-1", seed=0)
    assert first == anonymize(models, "item-1", seed=0)
    assert sorted(first) == ["A", "B", "C"] and sorted(first.values()) == sorted(models)
    orders = {tuple(anonymize(models, f"item-{i}", seed=0).values()) for i in range(30)}
    assert len(orders) > 1  # positions are shuffled across items
    with pytest.raises(ValueError, match="at most 26"):
        anonymize([f"m{i}" for i in range(27)], "x")


def test_prompts_carry_the_item_and_hide_model_names():
    settings = JudgeSettings(max_answer_chars=40)
    classify = classify_messages(ITEM, "Sherlock Holmes", settings)[-1]["content"]
    assert "Knowledge question, Attitude question, or Neither" in classify and "Sherlock Holmes" in classify
    assert "misinformed" in classify and " [...]" in classify  # the reference is clipped at 40 characters
    knowledge = score_messages(ITEM, "Bees, in Sussex.", "knowledge", "Sherlock Holmes")[-1]["content"]
    attitude = score_messages(ITEM, "Bees, in Sussex.", "attitude", "Sherlock Holmes")[-1]["content"]
    assert (
        KNOWLEDGE_RUBRIC in knowledge and ATTITUDE_RUBRIC in attitude and knowledge.endswith("Score (0-5):")
    )
    induced = induction_messages(ITEM, "I never kept pigs.", "Sherlock Holmes")[-1]["content"]
    assert "false premise" in induced and "I never kept pigs." in induced and "Yes or No" in induced
    letters = anonymize(["base", "dpo"], ITEM["item_id"])
    ranking = ranking_messages(ITEM, {k: f"answer of {v}" for k, v in letters.items()}, "Sherlock Holmes")
    text = ranking[-1]["content"]
    assert "Answer A: answer of" in text and "Answer B: answer of" in text
    assert '"model": "A"' in text and "base" not in text.replace("answer of base", "")
    with pytest.raises(KeyError):
        score_messages(ITEM, "x", "neither", "Sherlock Holmes")


def test_aggregates_count_every_reply():
    def j(ok, value):
        return {"ok": ok, "value": value}

    scores = [j(True, 4.0), j(True, 2.0), j(True, None), j(False, None)]
    summary = summarize_scores(scores)
    assert summary == {
        "mean": 3.0,
        "asked": 4,
        "parsed": 2,
        "unparsed": 1,
        "failed": 1,
        "histogram": {"2": 1, "4": 1},
    }
    induction = summarize_induction([j(True, True), j(True, False), j(True, True), j(True, None)])
    assert induction["rate"] == pytest.approx(2 / 3) and induction["yes"] == 2 and induction["no"] == 1
    assert induction["asked"] == 4 and induction["unparsed"] == 1
    assert summarize_scores([])["mean"] is None and summarize_induction([j(False, None)])["rate"] is None
    counts = count_parsed(scores)
    assert counts["asked"] == counts["parsed"] + counts["unparsed"] + counts["failed"]
