"""A model's probe metrics: every probe's choices scored as the persona's reply with its own stage's
token and, for twin probes, with each other stage's token (the stage effect), then the metrics.
Used by evaluation during training and by `persllm probe` / `persllm eval`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flax import nnx

from persllm_jax.personas.materials import Persona
from persllm_jax.personas.probes import Probe
from persllm_jax.personas.prompts import persona_conversation
from persllm_jax.train.probing.metrics import probe_metrics, probe_records, twin_groups
from persllm_jax.train.probing.scoring import EncodedReply, ReplyScorer, encode_reply


def asked_stages(probes: Sequence[Probe]) -> list[tuple[Probe, str]]:
    """(probe, stage whose token it is asked with): its own stage, and for a twin probe every other
    stage of its group (the stage effect)."""
    twin_stages = {twin: [p.stage for p in members] for twin, members in twin_groups(probes).items()}
    asked = []
    for p in probes:
        asked.append((p, p.stage))
        asked += [(p, s) for s in twin_stages.get(p.twin, []) if s != p.stage]
    return asked


def encode_probes(tokenizer, probes: Sequence[Probe], personas: Mapping[str, Persona]) -> dict:
    """{(probe id, stage, choice index): EncodedReply} for every probe asked at every stage it is asked."""
    encoded = {}
    for probe, stage in asked_stages(probes):
        persona = personas[probe.persona]
        messages = persona_conversation(persona, persona.stage(stage), probe.question)
        for i, choice in enumerate(probe.choices):
            encoded[(probe.id, stage, i)] = encode_reply(
                tokenizer, messages, choice, what=f"probe {probe.id} ({probe.file}:{probe.line}) choice {i}"
            )
    return encoded


class ProbeScorer:
    """One model's probe metrics; `run(state)` again after training changes the parameters."""

    def __init__(
        self,
        graphdef,
        tokenizer,
        probes: Sequence[Probe],
        personas: Mapping[str, Persona],
        seed: int = 0,
    ):
        if not probes:
            raise ValueError("no probes to score")
        self.probes, self.personas, self.seed = list(probes), dict(personas), seed
        self.replies = ReplyScorer(graphdef, tokenizer)
        self.encoded: dict[tuple[str, str, int], EncodedReply] = encode_probes(
            tokenizer, self.probes, self.personas
        )

    @classmethod
    def for_model(cls, model, tokenizer, probes, personas, seed=0):
        graphdef, state = nnx.split(model)
        return cls(graphdef, tokenizer, probes, personas, seed), state

    def choice_scores(self, state) -> tuple[dict, dict]:
        """({(probe id, stage): mean log-prob per choice}, the same summed)."""
        keys = list(self.encoded)
        total, count = self.replies.score(state, [self.encoded[k] for k in keys])
        mean_scores: dict[tuple[str, str], list[float]] = {}
        summed_scores: dict[tuple[str, str], list[float]] = {}
        for (probe_id, stage, _), t, c in zip(keys, total, count):
            mean_scores.setdefault((probe_id, stage), []).append(float(t / c))
            summed_scores.setdefault((probe_id, stage), []).append(float(t))
        return mean_scores, summed_scores

    def run(self, state, with_records: bool = True) -> dict:
        mean_scores, summed_scores = self.choice_scores(state)
        out = probe_metrics(self.probes, mean_scores, summed_scores, self.seed)
        if with_records:
            out["probes"] = probe_records(self.probes, mean_scores, summed_scores)
        return out
