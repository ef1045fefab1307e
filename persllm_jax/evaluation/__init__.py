"""Evaluation of personified models: distinction BLEU between answers of personas and stages,
held-out likelihood and DPO reward metrics, the LLM judge's knowledge, attitude, anti-induction
and ranking scores, and the report that puts them side by side. Uses train (log-probs), inference
(answers), personas and llm (the judge)."""

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
