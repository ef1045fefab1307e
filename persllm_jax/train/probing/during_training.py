"""Persona probes during training: at each evaluation, the probes of the run's personas are scored
with the current parameters, giving `eval/probes/accuracy`, `eval/probes/twin_accuracy` and
`eval/probes/stage_effect` beside the held-out loss (the same scoring as `persllm probe`)."""

from __future__ import annotations

import logging
from pathlib import Path

from persllm_jax.personas.materials import load_personas
from persllm_jax.personas.probes import persona_probe_files, read_probes
from persllm_jax.train.probing.scorer import ProbeScorer

log = logging.getLogger(__name__)

METRICS = ("accuracy", "twin_accuracy", "stage_effect")


class TrainingProbes:
    def __init__(self, scorer: ProbeScorer):
        self.scorer = scorer

    @classmethod
    def create(cls, cfg, task, graphdef) -> TrainingProbes | None:
        """The probes of this run, or None (no evaluation, turned off, or no probe set for its personas)."""
        section = cfg.eval
        if section.every_steps <= 0 or not section.with_probes:
            return None
        run_personas = [p for p in task.groups.personas if p]
        folder = Path(section.personas_dir)
        if not section.probes and not folder.is_dir():
            log.info("eval: no persona probes (no personas directory %s)", folder)
            return None
        personas = {p.id: p for p in load_personas(folder)}
        files = list(section.probes) or persona_probe_files(
            folder, [p for p in run_personas if p in personas]
        )
        probes = (
            [p for p in read_probes(files, personas.values()) if p.persona in run_personas] if files else []
        )
        if not probes:
            log.info("eval: no persona probes for the personas of this run %s", run_personas)
            return None
        log.info(
            "eval: %d persona probes of %s at every evaluation",
            len(probes),
            sorted({p.persona for p in probes}),
        )
        return cls(ProbeScorer(graphdef, task.tokenizer, probes, personas))

    def run(self, params) -> dict:
        result = self.scorer.run(params, with_records=False)
        return {f"eval/probes/{name}": result[name]["overall"]["value"] for name in METRICS}
