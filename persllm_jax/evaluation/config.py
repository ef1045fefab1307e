"""The config of `persllm eval`: which models, which held-out data, how to sample, which probes, which
judge."""

from __future__ import annotations

import dataclasses

from persllm_jax.inference.sampling import PERSONA_SAMPLING
from persllm_jax.llm.endpoint import EndpointConfig


@dataclasses.dataclass(frozen=True)
class EvalModel:
    name: str  # the row name in the report: base, sft, dpo, ...
    path: str  # HF dir, .gguf file, persllm model dir or run dir
    run_dir: str = ""  # a training run whose metrics.jsonl gives a loss curve; "" = none


@dataclasses.dataclass(frozen=True)
class EvalData:
    dialogues: str = ""  # dialogues.jsonl from build-data; its held-out split is evaluated
    pairs: str = ""  # pairs.jsonl; "" = no DPO metrics
    split: str = "test"
    personas_dir: str = "examples/personas"  # system prompts of the identities the model is asked to be
    max_items: int = 0  # held-out questions, spread evenly over personas and stages; 0 = all
    max_pairs: int = 0  # 0 = all


@dataclasses.dataclass(frozen=True)
class EvalGeneration:
    # Intra BLEU compares two samples, so generation must sample (the paper's setting is unpublished).
    max_new_tokens: int = 128
    temperature: float = PERSONA_SAMPLING.temperature
    top_p: float = PERSONA_SAMPLING.top_p
    top_k: int = PERSONA_SAMPLING.top_k
    repetition_penalty: float = PERSONA_SAMPLING.repetition_penalty
    seed: int = 0
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class EvalLikelihood:
    seq_len: int = 1024
    batch_size: int = 8
    beta: float = 0.1  # DPO rewards are beta * (policy - reference) log-probs, as in training
    reference: str = ""  # model whose log-probs are the DPO reference; "" = "sft" if listed, else the first


@dataclasses.dataclass(frozen=True)
class EvalProbes:
    enabled: bool = True  # off, or no probe file found: no probes section
    files: tuple[str, ...] = ()  # probe files; empty = the probes.jsonl of each persona in data.personas_dir
    seed: int = 0  # the bootstrap intervals' seed


@dataclasses.dataclass(frozen=True)
class EvalJudge(EndpointConfig):
    """The judge's endpoint (`enabled: false` skips the judge), by default with fewer requests at once
    and a longer timeout than an `EndpointConfig`."""

    enabled: bool = True
    concurrency: int = 4
    timeout_s: float = 300.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    out_dir: str
    models: tuple[EvalModel, ...] = ()
    data: EvalData = EvalData()
    generation: EvalGeneration = EvalGeneration()
    likelihood: EvalLikelihood = EvalLikelihood()
    probes: EvalProbes = EvalProbes()
    judge: EvalJudge = EvalJudge()
    dtype: str = "float32"
    title: str = "PersLLM evaluation"
