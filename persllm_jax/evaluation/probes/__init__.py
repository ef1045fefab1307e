"""Judge-free persona probes for `persllm probe` and `persllm eval`: persona attribution on held-out
dialogues, the run over models and its tables (the probe format is `personas/probes.py`, the
scoring `train/probing/`)."""

from persllm_jax.evaluation.probes.run import markdown_section, probe_models, score_model, write_outputs

__all__ = ["markdown_section", "probe_models", "score_model", "write_outputs"]
