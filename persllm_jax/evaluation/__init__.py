"""Evaluation of personified models (PersLLM section 3): distinction BLEU, LLM-judge metrics, reports."""

from persllm_jax.evaluation.distinction import bleu, distinction_bleu
from persllm_jax.evaluation.judge import JudgeSettings, judge_answers, run_judge
from persllm_jax.evaluation.report import collect_metrics, write_report

__all__ = [
    "JudgeSettings",
    "bleu",
    "collect_metrics",
    "distinction_bleu",
    "judge_answers",
    "run_judge",
    "write_report",
]
