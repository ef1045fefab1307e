"""The config of `persllm build-data`: one frozen dataclass per concern."""

from __future__ import annotations

import dataclasses

from persllm_jax.llm.endpoint import EndpointConfig


@dataclasses.dataclass(frozen=True)
class LLMSection(EndpointConfig):
    """The annotator's endpoint, and the sampling every annotation request uses unless it says otherwise."""

    temperature: float = 0.7
    max_tokens: int = 512
    seed: int = 0  # sent to servers that honour it; also part of the cache key


@dataclasses.dataclass(frozen=True)
class RetrievalSection:
    model: str = ""  # sentence-transformers model path; empty = the offline all-MiniLM-L6-v2
    objective_words: int = 1500  # knowledge + experiences, seed paragraph first
    subjective_words: int = 500  # speech records, for the persona's style


@dataclasses.dataclass(frozen=True)
class QuestionsSection:
    # relative weights of the three inputs the annotator raises per seed paragraph
    kinds: dict = dataclasses.field(
        default_factory=lambda: {"ordinary": 0.5, "opinion": 0.25, "induced": 0.25}
    )
    max_attempts: int = 3  # unparsable questions are asked again, then dropped


@dataclasses.dataclass(frozen=True)
class LimitsSection:
    seeds_per_stage: int = 0  # 0 = every paragraph is a seed
    max_response_words: int = 250  # longer responses are dropped as over-long
    # The paper drops replies without a [Response] part. A small local annotator often answers
    # in voice but untagged: false keeps such replies whole (those that start [Analysis] still drop).
    require_response_tag: bool = True


@dataclasses.dataclass(frozen=True)
class DedupSection:
    threshold: float = 0.95  # question cosine similarity at which a later item is dropped


@dataclasses.dataclass(frozen=True)
class SplitSection:
    test_fraction: float = 0.2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CrossPersonaSection:
    enabled: bool = True
    skip_top: int = 5  # the most similar questions are skipped: their answers may be right too
    # each pair also under the other persona's prompt (same question), chosen and rejected swapped:
    # trained together (dpo.mirrors_together), the two ask whose prompt each answer belongs to
    mirrored: bool = False


@dataclasses.dataclass(frozen=True)
class PairsSection:
    cross_persona: CrossPersonaSection = CrossPersonaSection()
    cross_stage: bool = True
    # each cross-stage pair is mirrored: the same question under the other stage's prompt, with
    # chosen and rejected swapped; false keeps the question's own stage only
    cross_stage_mirrored: bool = True


@dataclasses.dataclass(frozen=True)
class GeneralDataSection:
    path: str = ""  # JSONL or `datasets` directory of general chats in messages format
    repeats: float = 0.2  # copies per persona dialogue copy; 0.2 = the paper's 5 : 1 mixture
    max_items: int = 0  # 0 = all


@dataclasses.dataclass(frozen=True)
class ReferenceSection:
    # each persona's reference.jsonl (hand-written dialogues), where it ships one, joins the
    # annotated dialogues and the pair mining
    include: bool = True
    # worked examples in every answer request: the persona's train-split reference dialogues at
    # the answering stage whose questions are nearest the seed's (0 = none)
    few_shot: int = 0


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    personas_dir: str = "examples/personas"
    out_dir: str = "out/data"
    personas: tuple[str, ...] = ()  # restrict to these persona ids; empty = all
    llm: LLMSection = LLMSection()
    retrieval: RetrievalSection = RetrievalSection()
    questions: QuestionsSection = QuestionsSection()
    limits: LimitsSection = LimitsSection()
    dedup: DedupSection = DedupSection()
    split: SplitSection = SplitSection()
    pairs: PairsSection = PairsSection()
    general_data: GeneralDataSection = GeneralDataSection()
    reference: ReferenceSection = ReferenceSection()
