"""`persllm build-data`: persona materials -> annotated persona dialogues and preference pairs.

Steps: load and validate the materials; embed every paragraph; pick seed paragraphs per stage;
ask the annotator for one input per seed (ordinary question, opinion or induced question);
answer each input with retrieved materials and Chain-of-Thought, in its own stage and, for
cross-stage pairs, in the persona's other stages; drop what cannot be parsed or fails the
quality filters; drop near-duplicate questions; split train/test by seed paragraph; add each
persona's reference dialogues (hand-written, split by question group); mine cross-persona and
cross-stage preference pairs; mix in general chat data; write the outputs.

Every LLM call goes through a content-addressed cache written as each answer arrives, so a
re-run (after a crash or a kill at any moment) repeats no call and yields the same records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from persllm_jax.builder import cleaning, outputs, pairs, parsing, prompts
from persllm_jax.builder.config import BuildConfig
from persllm_jax.builder.references import ReferenceExamples, reference_items
from persllm_jax.builder.retrieval import Embedder, fill_budget, nearest
from persllm_jax.llm.client import LLMClient
from persllm_jax.personas.materials import load_personas

log = logging.getLogger(__name__)

KINDS = ("ordinary", "opinion", "induced")


@dataclasses.dataclass
class Item:
    """One seed's input and its answers; an annotation record once written."""

    id: str
    persona: str
    stage: str
    kind: str
    seed_id: str
    stance: int = 0
    question: str | None = None
    answers: dict = dataclasses.field(default_factory=dict)  # stage -> answer record
    drop_reason: str | None = None
    split: str | None = None


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _check_kinds(kinds: dict) -> dict:
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown questions.kinds {unknown}; valid kinds: {', '.join(KINDS)}")
    weights = {k: float(kinds.get(k, 0.0)) for k in KINDS}
    if sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ValueError(f"questions.kinds weights must be >= 0 and not all 0, got {kinds}")
    return weights


class Builder:
    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.kinds = _check_kinds(cfg.questions.kinds)
        if cfg.reference.few_shot < 0:
            raise ValueError(
                f"reference.few_shot must be >= 0 (0 = no examples), got {cfg.reference.few_shot}"
            )
        personas = load_personas(cfg.personas_dir)
        if cfg.personas:
            unknown = sorted(set(cfg.personas) - {p.id for p in personas})
            if unknown:
                raise ValueError(f"personas {unknown} not found in {cfg.personas_dir}")
            personas = [p for p in personas if p.id in cfg.personas]
        self.personas = {p.id: p for p in personas}
        self.stages = {(p.id, s.id): s for p in personas for s in p.stages}
        self.paragraphs = {par.id: par for s in self.stages.values() for par in s.paragraphs}
        self.embedder = Embedder(cfg.retrieval.model, self.out_dir / "cache" / "embeddings.npz")
        ids = list(self.paragraphs)
        vectors = self.embedder.encode([self.paragraphs[i].text for i in ids])
        self.vectors = dict(zip(ids, vectors))
        self.client = LLMClient.from_config(
            cfg.llm,
            self.out_dir / "cache",
            temperature=cfg.llm.temperature,
            max_tokens=cfg.llm.max_tokens,
            seed=cfg.llm.seed,
        )
        self.drops: Counter = Counter()
        ref = cfg.reference
        # the reference dialogues: build items of their own, and (few_shot) the annotator's examples
        self.references = []
        if ref.include or ref.few_shot:
            self.references = reference_items(
                personas, cfg.personas_dir, cfg.split.test_fraction, cfg.split.seed, Item
            )
        self.examples = None
        if ref.few_shot:
            self.examples = ReferenceExamples(
                self.references, self.embedder, ref.few_shot, cfg.dedup.threshold
            )
            log.info(
                "answer requests show up to %d train-split reference answers of their persona and stage "
                "(%d such answers in all)",
                ref.few_shot,
                sum(len(e) for e in self.examples.examples.values()),
            )

    # -- seeds and inputs ------------------------------------------------------------------

    def seed_items(self) -> list[Item]:
        items = []
        split_seed = self.cfg.split.seed
        kind_names = list(self.kinds)
        probabilities = np.asarray([self.kinds[k] for k in kind_names])
        probabilities = probabilities / probabilities.sum()
        for (persona, stage_id), stage in self.stages.items():
            seeds = list(stage.paragraphs)
            limit = self.cfg.limits.seeds_per_stage
            if limit and limit < len(seeds):
                chosen = _rng(split_seed, "seeds", persona, stage_id).choice(len(seeds), limit, replace=False)
                seeds = [seeds[i] for i in sorted(chosen)]
            for paragraph in seeds:
                rng = _rng(split_seed, "kind", paragraph.id)
                kind = str(rng.choice(kind_names, p=probabilities))
                items.append(
                    Item(
                        id=f"{paragraph.id}/{kind}",
                        persona=persona,
                        stage=stage_id,
                        kind=kind,
                        seed_id=paragraph.id,
                        stance=int(rng.integers(3)),
                    )
                )
        return items

    async def annotate(self, items: list[Item]) -> None:
        """Every seed at once, each on its own: its input, then its answers (in its own stage and,
        for cross-stage pairs, in the persona's other stages), each request sent again with the
        next seed as soon as its reply fails to parse. No seed waits for another, so the annotator
        holds as many requests as the client's limit allows until the last seed is done, where
        a round of requests per attempt would leave it a few slow ones at the end of each round."""
        from persllm_jax.progress import Progress

        bar = Progress(len(items), "annotated seeds", unit="seed")

        async def one(item: Item) -> None:
            await self._ask(item)
            if item.question is not None:
                stages = self._answer_stages(item)
                records = await asyncio.gather(*(self._answer(item, s) for s in stages))
                item.answers = dict(zip(stages, records))
                own = item.answers[item.stage]
                if "response" not in own:
                    item.drop_reason = own.get("drop_reason", "no response")
            bar.update(1)
            c = self.client.stats()
            bar.set_postfix(
                tok=f"{c['prompt_tokens']}+{c['completion_tokens']}",
                hits=c["cache_hits"],
                fail=c["failures"],
                refresh=False,
            )

        tasks = [asyncio.ensure_future(one(item)) for item in items]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            bar.close()

    async def _complete(self, messages, tag: str, attempt: int):
        # A new attempt samples with a new seed: the same body would get the same answer again.
        llm = self.cfg.llm
        return await self.client.complete(
            messages, tag=tag, temperature=llm.temperature, max_tokens=llm.max_tokens, seed=llm.seed + attempt
        )

    async def _ask(self, item: Item) -> None:
        """The seed's input (ordinary question, opinion or induced question), asked again while
        the reply does not parse."""
        persona, stage = self.personas[item.persona], self.stages[(item.persona, item.stage)]
        messages = prompts.question_messages(
            name=persona.name,
            description=persona.description,
            when=stage.when,
            seed=self.paragraphs[item.seed_id].text,
            kind=item.kind,
            stance_index=item.stance,
        )
        for attempt in range(self._attempts()):
            result = await self._complete(messages, f"question:{item.id}:{attempt}", attempt)
            if result.error:
                item.drop_reason = f"question request failed ({result.error.reason})"
                return
            question, reason = parsing.parse_question(
                result.text, material=self.paragraphs[item.seed_id].text
            )
            if question is not None:
                item.question, item.drop_reason = question, None
                return
            item.drop_reason = reason

    # -- answers ---------------------------------------------------------------------------

    def retrieve(self, item: Item, stage_id: str) -> tuple[list, list]:
        """Objective and subjective materials of `stage_id` for the item's question."""
        stage = self.stages[(item.persona, stage_id)]
        query = self.embedder.encode([item.question])[0]
        budgets = {
            "objective": self.cfg.retrieval.objective_words,
            "subjective": self.cfg.retrieval.subjective_words,
        }
        picked = {}
        for category, budget in budgets.items():
            store = [p for p in stage.paragraphs if p.category == category]
            vectors = np.stack([self.vectors[p.id] for p in store]) if store else np.zeros((0, 1))
            order = nearest(query, vectors)
            first = next((i for i, p in enumerate(store) if p.id == item.seed_id), None)
            chosen = fill_budget(order, [len(p.text.split()) for p in store], budget, first)
            picked[category] = [store[i] for i in chosen]
        return picked["objective"], picked["subjective"]

    def _answer_stages(self, item: Item) -> list[str]:
        stages = [item.stage]
        if self.cfg.pairs.cross_stage:
            stages += [s.id for s in self.personas[item.persona].stages if s.id != item.stage]
        return stages

    async def _answer(self, item: Item, stage_id: str) -> dict:
        """The answer record of the item's input in `stage_id` (retrieved materials, the raw reply,
        and the parsed analysis and response, or why there are none), asked again while the reply
        does not parse."""
        persona, stage = self.personas[item.persona], self.stages[(item.persona, stage_id)]
        objective, subjective = self.retrieve(item, stage_id)
        messages = prompts.response_messages(
            name=persona.name,
            description=persona.description,
            when=stage.when,
            objective=[p.text for p in objective],
            subjective=[p.text for p in subjective],
            question=item.question,
            examples=self.examples(item.persona, stage_id, item.question) if self.examples else (),
        )
        record: dict = {}
        for attempt in range(self._attempts()):
            result = await self._complete(messages, f"response:{item.id}:{stage_id}:{attempt}", attempt)
            record = {
                "stage": stage_id,
                "retrieved": {
                    "objective": [p.id for p in objective],
                    "subjective": [p.id for p in subjective],
                },
                "raw": result.text,
                "usage": result.usage,
                "finish_reason": result.finish_reason,
            }
            if result.error:
                record["drop_reason"] = f"response request failed ({result.error.reason})"
                record["error"] = str(result.error)
                break
            parsed, reason = parsing.parse_response(
                result.text, self.cfg.limits.max_response_words, self.cfg.limits.require_response_tag
            )
            if parsed is not None:
                record["analysis"], record["response"] = parsed
                break
            record["drop_reason"] = reason
        return record

    def _attempts(self) -> int:
        # Greedy decoding answers a repeated prompt identically, so asking again cannot help.
        return 1 if self.cfg.llm.temperature == 0 else self.cfg.questions.max_attempts

    # -- the whole build -------------------------------------------------------------------

    async def run_async(self) -> dict:
        items = self.seed_items()
        log.info("%d seed paragraphs over %d persona stages", len(items), len(self.stages))
        await self.annotate(items)
        kept = [i for i in items if i.drop_reason is None]
        kept, duplicates = cleaning.drop_near_duplicates(kept, self.embedder, self.cfg.dedup.threshold)
        for item in duplicates:
            item.drop_reason = "near-duplicate question"
        cleaning.assign_splits(kept, self.cfg.split.test_fraction, self.cfg.split.seed)
        references = self.references if self.cfg.reference.include else []
        log.info("%d reference dialogues", len(references))
        kept += references
        dialogue_rows = [outputs.dialogue_row(i, self.personas, self.stages) for i in kept]
        pair_rows = []
        if self.cfg.pairs.cross_stage:
            pair_rows += pairs.cross_stage_pairs(
                kept, self.personas, self.stages, self.cfg.pairs.cross_stage_mirrored
            )
        if self.cfg.pairs.cross_persona.enabled:
            pair_rows += pairs.cross_persona_pairs(
                kept,
                self.embedder,
                self.personas,
                self.stages,
                self.cfg.pairs.cross_persona.skip_top,
                self.cfg.pairs.cross_persona.mirrored,
            )
        general_rows = outputs.general_rows(self.cfg.general_data, len(dialogue_rows), self.cfg.split.seed)
        stats = outputs.stats(
            items, dialogue_rows, pair_rows, general_rows, self.client.stats(), len(references)
        )
        outputs.write_all(self.out_dir, items, dialogue_rows + general_rows, pair_rows, stats)
        return stats

    def run(self) -> dict:
        async def main():
            try:
                return await self.run_async()
            finally:
                await self.client.aclose()

        return asyncio.run(main())


def build(cfg: BuildConfig) -> dict:
    return Builder(cfg).run()
