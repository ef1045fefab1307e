"""On-policy preference pairs for DPO: the starting model answers the training questions of chosen
kinds (the false-premise, `induced` ones by default) and each of its answers becomes the rejected
side of a pair whose chosen side is the dialogue's own answer.

A small SFT model plays along with a false claim about its persona more often than it corrects it;
pairs mined from the data alone (cross-stage, cross-persona) never show it its own playing along.
These do: they push down the answer the model would give and push up the one it should.

The pairs are sampled once, with the weights DPO starts from, before the first step, and written
to `<run_dir>/on_policy_pairs.jsonl` (source `on_policy`, the preference-pair format), with what they
were sampled from beside it (`on_policy_pairs.origin.json`: the weights' fingerprint and the
settings); a resumed run reads that file, so it trains on the same pairs. Sampling runs in a
single process (the model may still be sharded over its devices); a job of several processes
resumes from a run directory that holds the pairs. The sampling itself is `builder/on_policy.py`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path

import jax
from flax import nnx

from persllm_jax.data import formats
from persllm_jax.data.readers import DataError, read_records
from persllm_jax.io.pretrained import read_generation_config, set_generation_config
from persllm_jax.train.config import DataSource, RunConfig
from persllm_jax.train.tasks.reference_cache import weights_fingerprint

log = logging.getLogger(__name__)

FILE_NAME = "on_policy_pairs.jsonl"
ORIGIN_FILE_NAME = "on_policy_pairs.origin.json"  # what they were sampled from


def prompt_and_answer(record: dict) -> tuple[list[dict], dict] | None:
    """The messages before the last assistant turn, and that turn (the record read as the SFT
    trainer reads it); None for a plain-text record or one that does not end with an answer."""
    messages = formats.sft_example(record).messages
    if len(messages or ()) < 2 or messages[-1].get("role") != "assistant":
        return None
    return list(messages[:-1]), messages[-1]


def questions(path: str, kinds: tuple[str, ...]) -> list[dict]:
    """The dialogues of `kinds` in the SFT dialogues file `path` that end with an answer (those
    marked for a split other than `train` left out)."""
    found = [r for r in read_records(path, split="train") if r.get("kind") in kinds]
    return [r for r in found if prompt_and_answer(r) is not None]


def sampled_from(cfg: RunConfig, weights: str) -> str:
    """What decides the sampled answers: the starting weights (their fingerprint), the tokenizer
    source and the sampling settings (`repeats` only weighs the pairs)."""
    settings = dataclasses.asdict(cfg.dpo.on_policy)
    settings.pop("repeats")
    model = {"weights": weights, "tokenizer": cfg.model.tokenizer, "compute_dtype": cfg.model.compute_dtype}
    return json.dumps({"model": model, **settings}, sort_keys=True)


def with_on_policy_pairs(
    cfg: RunConfig, run_dir: Path, tokenizer, graphdef, initial_params, sample_pairs
) -> RunConfig:
    """`cfg` with the on-policy pairs as one more training source; `cfg` itself when
    `dpo.on_policy.dialogues` is empty. A resumed run (`initial_params` a callable: the weights
    are loaded again only on request) reads the pairs its first start sampled; a fresh start
    samples them, unless the run directory holds pairs sampled from the same weights with the same
    settings. `sample_pairs(model, tokenizer, dialogues, section) -> pairs` samples them
    (builder/on_policy.py: generation is a layer beside training, not below it)."""
    section = cfg.dpo.on_policy
    if not section.dialogues:
        return cfg
    path = run_dir / FILE_NAME
    origin_path = run_dir / ORIGIN_FILE_NAME
    if callable(initial_params):
        if not path.is_file():
            raise DataError(
                f"{path}: missing; this resumed run trained on the on-policy pairs its first start "
                "sampled there (start the run afresh in a new run directory to sample new ones)"
            )
    else:
        origin = sampled_from(cfg, weights_fingerprint(initial_params))
        if not (path.is_file() and origin_path.is_file() and origin_path.read_text() == origin):
            model = functools.partial(nnx.merge, graphdef, initial_params)  # built once the data is read
            pairs = _sample(cfg, run_dir, tokenizer, model, sample_pairs)
            origin_path.unlink(missing_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_text("".join(json.dumps(p) + "\n" for p in pairs))
            os.replace(partial, path)
            origin_path.write_text(origin)  # last: pairs without it are sampled again
    source = DataSource(path=str(path), repeats=section.repeats, split="train")
    data = dataclasses.replace(cfg.data, sources=(*cfg.data.sources, source))
    return dataclasses.replace(cfg, data=data)


def _sample(cfg: RunConfig, run_dir: Path, tokenizer, make_model, sample_pairs) -> list[dict]:
    section = cfg.dpo.on_policy
    if jax.process_count() > 1:
        raise ValueError(
            f"dpo.on_policy samples its pairs in one process (this job has {jax.process_count()}): "
            f"start it once in one process to write {run_dir / FILE_NAME}, then start or resume it on all"
        )
    if sample_pairs is None:
        raise ValueError("dpo.on_policy needs a sampler: run DPO through `persllm dpo`")
    dialogues = questions(section.dialogues, tuple(section.kinds))
    if not dialogues:
        raise DataError(
            f"{section.dialogues}: no train-split dialogue of kind {', '.join(section.kinds)} "
            "for dpo.on_policy to answer"
        )
    # the training model is built from its config alone: it stops at the end-of-turn ids of the
    # generation config the run directory keeps for it
    model = make_model()
    set_generation_config(model, read_generation_config(run_dir))
    started = time.time()
    pairs, capped = sample_pairs(model, tokenizer, dialogues, section)
    log.info(
        "on-policy pairs: %d of %d answers sampled in %.0f s differ from the written ones (%d stopped "
        "at dpo.on_policy.max_new_tokens)",
        len(pairs),
        len(dialogues),
        time.time() - started,
        capped,
    )
    if not pairs:
        raise DataError(
            f"dpo.on_policy: every answer the model sampled to the {len(dialogues)} questions of "
            f"{section.dialogues} is empty or the written one: no pair to train on"
        )
    return pairs
