"""On-policy preference pairs for DPO: the starting model answers the training questions of chosen
kinds (the false-premise, `induced` ones by default) and each of its answers becomes the rejected
side of a pair whose chosen side is the dialogue's own answer.

A small SFT model plays along with a false claim about its persona more often than it corrects it;
pairs mined from the data alone (cross-stage, cross-persona) never show it its own playing along.
These do: they push down the answer the model would give and push up the one it should.

The pairs are sampled once, with the weights DPO starts from, before the first step, and written
to `<run_dir>/on_policy_pairs.jsonl` (source `on_policy`, the preference-pair format), with what they
were sampled from beside it (`on_policy_pairs.origin.json`); a resumed run reads that file, so it
trains on the same pairs. Every process samples (the model may be sharded
over all of them); the first writes the file. The sampling itself is `builder/on_policy.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
from flax import nnx

from persllm_jax.data.readers import DataError, location, read_records
from persllm_jax.train.config import DataSource, RunConfig

log = logging.getLogger(__name__)

FILE_NAME = "on_policy_pairs.jsonl"


def prompt_and_answer(record: dict) -> tuple[list[dict], dict] | None:
    """The messages before the last assistant turn, and that turn; None without one."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise DataError(f"{location(record)}: an SFT dialogue needs a list of `messages`")
    if messages[-1].get("role") != "assistant" or len(messages) < 2:
        return None
    return messages[:-1], messages[-1]


def questions(path: str, kinds: tuple[str, ...]) -> list[dict]:
    """The train-split persona dialogues of `kinds` in the SFT dialogues file `path`."""
    found = [r for r in read_records(path, split="train") if r.get("kind") in kinds]
    return [r for r in found if prompt_and_answer(r) is not None]


def sampled_from(cfg: RunConfig) -> str:
    """What decides the sampled answers: the starting model and the sampling settings."""
    m = cfg.model
    model = [m.path, m.preset, m.seed, list(m.add_tokens), m.dtype, m.compute_dtype]
    return json.dumps({"model": model, **dataclasses.asdict(cfg.dpo.on_policy)}, sort_keys=True)


def with_on_policy_pairs(
    cfg: RunConfig, run_dir: Path, tokenizer, graphdef, initial_params, sample_pairs
) -> RunConfig:
    """`cfg` with the on-policy pairs as one more training source (sampled now unless the run
    directory has them); `cfg` itself when `dpo.on_policy.dialogues` is empty.
    `sample_pairs(model, tokenizer, dialogues, section) -> pairs` samples them (builder/on_policy.py:
    generation is a layer beside training, not below it)."""
    section = cfg.dpo.on_policy
    if not section.dialogues:
        return cfg
    path = run_dir / FILE_NAME
    # a fresh start in a run directory that holds pairs of another model or other settings samples
    # again (a resume cannot differ: its config is checked)
    origin = sampled_from(cfg)
    origin_path = path.with_suffix(".origin.json")
    if not (path.is_file() and origin_path.is_file() and origin_path.read_text() == origin):
        if sample_pairs is None:
            raise ValueError("dpo.on_policy needs a sampler: run DPO through `persllm dpo`")
        dialogues = questions(section.dialogues, tuple(section.kinds))
        if not dialogues:
            raise DataError(
                f"{section.dialogues}: no train-split dialogue of kind {', '.join(section.kinds)} "
                "for dpo.on_policy to answer"
            )
        started = time.time()
        params = initial_params() if callable(initial_params) else initial_params
        pairs = sample_pairs(nnx.merge(graphdef, params), tokenizer, dialogues, section)
        log.info(
            "on-policy pairs: %d of %d answers sampled in %.0f s differ from the written ones (%s)",
            len(pairs),
            len(dialogues),
            time.time() - started,
            path,
        )
        if not pairs:
            raise DataError(
                f"dpo.on_policy: every answer the model sampled to the {len(dialogues)} questions of "
                f"{section.dialogues} is empty or the written one: no pair to train on"
            )
        if jax.process_index() == 0:
            partial = path.with_suffix(".partial")
            partial.write_text("".join(json.dumps(p) + "\n" for p in pairs))
            origin_path.write_text(origin)
            os.replace(partial, path)  # a run killed while writing samples again
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("on-policy pairs written")
    source = DataSource(path=str(path), repeats=section.repeats, split="train")
    data = dataclasses.replace(cfg.data, sources=(*cfg.data.sources, source))
    return dataclasses.replace(cfg, data=data)
