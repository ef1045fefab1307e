"""`persllm pipeline`: the whole method end to end, each step a `persllm` subprocess with its
resolved config, done markers so that a rerun skips what is finished, and a final check that
transformers reloads the export and answers as each persona. Uses every other package."""

from persllm_jax.pipeline.runner import PipelineConfig, PipelineError, run_pipeline

__all__ = ["PipelineConfig", "PipelineError", "run_pipeline"]
