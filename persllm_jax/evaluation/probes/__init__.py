"""Judge-free persona probes: multiple-choice questions scored by the model's own likelihoods
(files, scoring with shared prompts, metrics, attribution, the run and its tables)."""

from persllm_jax.evaluation.probes.files import Probe, ProbeFileError, persona_probe_files, read_probes
from persllm_jax.evaluation.probes.run import ProbeScorer, markdown_section, probe_models, write_outputs

__all__ = [
    "Probe",
    "ProbeFileError",
    "ProbeScorer",
    "markdown_section",
    "persona_probe_files",
    "probe_models",
    "read_probes",
    "write_outputs",
]
