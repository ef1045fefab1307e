"""The LLM judge of PersLLM section 3: through any OpenAI-compatible endpoint, it classifies each held-out
question as a knowledge or an attitude question, scores every model's answer against the reference with
that class's rubric, asks whether answers to false-premise questions reject the premise, and ranks the
models' answers to each question with the models hidden behind shuffled letters. `prompts` builds the
requests, `parsing` reads replies that may ignore the requested format, `procedure` runs the steps
through a cached client, and `aggregate` turns judgments into per-model and per-persona metrics with
counts of what was asked, parsed, unparsed and failed.
"""

from persllm_jax.evaluation.judge.aggregate import (
    count_parsed,
    model_summary,
    summarize_induction,
    summarize_judgments,
    summarize_ranks,
    summarize_scores,
)
from persllm_jax.evaluation.judge.parsing import (
    LABELS,
    SCORE_MAX,
    SCORE_MIN,
    find_structured,
    parse_label,
    parse_ranking,
    parse_score,
    parse_yes_no,
)
from persllm_jax.evaluation.judge.procedure import (
    judge_answers,
    judged_answers,
    parse_model_ranking,
    question_items,
    run_judge,
)
from persllm_jax.evaluation.judge.prompts import (
    JudgeSettings,
    anonymize,
    classify_messages,
    induction_messages,
    ranking_messages,
    score_messages,
)

__all__ = [
    "LABELS",
    "SCORE_MAX",
    "SCORE_MIN",
    "JudgeSettings",
    "anonymize",
    "classify_messages",
    "count_parsed",
    "find_structured",
    "induction_messages",
    "judge_answers",
    "judged_answers",
    "model_summary",
    "parse_label",
    "parse_model_ranking",
    "parse_ranking",
    "parse_score",
    "parse_yes_no",
    "question_items",
    "ranking_messages",
    "run_judge",
    "score_messages",
    "summarize_induction",
    "summarize_judgments",
    "summarize_ranks",
    "summarize_scores",
]
