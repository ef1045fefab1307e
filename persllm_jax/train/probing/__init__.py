"""Persona probes scored by a model's own likelihoods: reply scoring on shared prompts, the metrics,
and the probes run at each evaluation of a training run."""
