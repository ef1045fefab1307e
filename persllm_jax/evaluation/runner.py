"""`persllm eval`: every model answers the held-out questions, then the metrics and the report.

Per model, answers and likelihoods are written under `<out_dir>/models/<name>/` with a fingerprint
of what produced them, so an interrupted evaluation resumes where it stopped and a changed model
or setting is recomputed. Judge calls are cached by the annotation client the same way.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from persllm_jax.configlib import ConfigError
from persllm_jax.data import formats
from persllm_jax.data.readers import read_records
from persllm_jax.evaluation import answers as answers_mod
from persllm_jax.evaluation import likelihood, report
from persllm_jax.evaluation.config import EvalConfig
from persllm_jax.evaluation.distinction import distinction_bleu
from persllm_jax.evaluation.probes.run import accuracy_line, probe_set_summary, score_model
from persllm_jax.inference.generation import Generator
from persllm_jax.io import pretrained
from persllm_jax.personas.materials import load_personas
from persllm_jax.personas.probes import persona_probe_files, read_probes
from persllm_jax.progress import Progress
from persllm_jax.train.probing.scorer import ProbeScorer

log = logging.getLogger(__name__)


def _check(cfg: EvalConfig) -> None:
    if not cfg.models:
        raise ConfigError("models is empty: list at least one {name, path}")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"models: names must be unique, got {names}")
    if not cfg.data.dialogues:
        raise ConfigError("data.dialogues is required (the dialogues.jsonl written by build-data)")
    if cfg.likelihood.reference and cfg.likelihood.reference not in names:
        raise ConfigError(
            f"likelihood.reference {cfg.likelihood.reference!r} is not one of the models {names}"
        )


def _fingerprint(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _model_stamp(path: str) -> dict:
    """What identifies a model's weights on disk: its path and the newest file's time and size."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    newest = max(files, key=lambda f: f.stat().st_mtime, default=p)
    return {"path": str(p.resolve()), "files": len(files), "newest": newest.stat().st_mtime if files else 0}


def _read_cached(path: Path, fingerprint: str):
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data["value"] if data.get("fingerprint") == fingerprint else None


def _write_cached(path: Path, fingerprint: str, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "value": value}))
    tmp.replace(path)


def _reference_name(cfg: EvalConfig) -> str:
    names = [m.name for m in cfg.models]
    return cfg.likelihood.reference or ("sft" if "sft" in names else names[0])


def _probe_set(cfg: EvalConfig, personas: dict) -> dict:
    """The probes of the evaluation (none when disabled or when no file is found), their summary and
    a fingerprint of the files' contents."""
    if not cfg.probes.enabled:
        return {"probes": [], "summary": None, "fingerprint": None}
    files = list(cfg.probes.files) or persona_probe_files(cfg.data.personas_dir, personas)
    if not files:
        log.info("eval: no probe files (no probes.jsonl in the persona folders): no probes section")
        return {"probes": [], "summary": None, "fingerprint": None}
    probes = read_probes(files, personas.values())
    contents = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    return {
        "probes": probes,
        "summary": {**probe_set_summary(probes, files), "seed": cfg.probes.seed},
        "fingerprint": [contents, cfg.probes.seed],
    }


def evaluate(cfg: EvalConfig) -> dict:
    """Run the whole evaluation; returns {"report": paths written, "metrics": the report input}."""
    _check(cfg)
    started = time.time()
    out = Path(cfg.out_dir)
    personas = {p.id: p for p in load_personas(cfg.data.personas_dir)}
    dialogues = read_records(cfg.data.dialogues, split=cfg.data.split or None)
    items = answers_mod.test_items(dialogues, personas, cfg.data.max_items)
    if not items:
        raise ValueError(
            f"{cfg.data.dialogues}: no persona dialogues in split {cfg.data.split!r} for the personas "
            f"in {cfg.data.personas_dir} ({', '.join(personas)})"
        )
    item_ids = {i.item_id for i in items}
    held_out = [formats.sft_example(r) for r in dialogues if r["id"] in item_ids]
    pair_records = read_records(cfg.data.pairs, split=cfg.data.split or None) if cfg.data.pairs else []
    if cfg.data.max_pairs:
        pair_records = pair_records[: cfg.data.max_pairs]
    pairs = [formats.preference_example(r) for r in pair_records]
    pair_sources = np.asarray([r.get("source") or "unknown" for r in pair_records])
    requests = answers_mod.answer_requests(items, personas)
    probe_set = _probe_set(cfg, personas)
    log.info(
        "eval: %d held-out questions, %d answers per model, %d pairs, models %s",
        len(items),
        len(requests),
        len(pairs),
        [m.name for m in cfg.models],
    )

    records, scores, probe_results = [], {}, {}
    for spec in cfg.models:
        model_dir = out / "models" / spec.name
        stamp = _model_stamp(spec.path)
        answer_fp = _fingerprint(stamp, requests, dataclasses.asdict(cfg.generation))
        score_fp = _fingerprint(
            stamp, [e.id for e in held_out], [p.id for p in pairs], cfg.likelihood.seq_len
        )
        probe_fp = _fingerprint(stamp, probe_set["fingerprint"], [dataclasses.asdict(i) for i in items])
        cached_answers = _read_cached(model_dir / "answers.json", answer_fp)
        cached_scores = _read_cached(model_dir / "likelihood.json", score_fp)
        cached_probes = _read_cached(model_dir / "probes.json", probe_fp) if probe_set["probes"] else {}
        if cached_answers is not None and cached_scores is not None and cached_probes is not None:
            log.info("eval: %s: answers, likelihoods and probes from %s", spec.name, model_dir)
            records += cached_answers
            scores[spec.name] = cached_scores
            probe_results[spec.name] = cached_probes
            continue
        model, tokenizer = pretrained.load_pretrained(spec.path, dtype=jnp.dtype(cfg.dtype))
        if cached_answers is None:
            generator = Generator(model, tokenizer, max_batch=cfg.generation.batch_size)
            with Progress(len(requests), f"answers ({spec.name})", unit="answer") as bar:
                cached_answers = answers_mod.answer_all(
                    generator, spec.name, requests, personas, cfg.generation, progress=bar
                )
            _write_cached(model_dir / "answers.json", answer_fp, cached_answers)
            del generator
        if cached_scores is None:
            scorer = likelihood.LikelihoodScorer(
                model, tokenizer, seq_len=cfg.likelihood.seq_len, batch_size=cfg.likelihood.batch_size
            )
            nll, counts = scorer.dialogue_nll(held_out)
            cached_scores = {"nll": nll.tolist(), "counts": counts.tolist()}
            if pairs:
                chosen, rejected = scorer.pair_logps(pairs)
                cached_scores.update(chosen=chosen.tolist(), rejected=rejected.tolist())
            _write_cached(model_dir / "likelihood.json", score_fp, cached_scores)
            del scorer
        if cached_probes is None:
            scorer, state = ProbeScorer.for_model(
                model, tokenizer, probe_set["probes"], personas, cfg.probes.seed
            )
            cached_probes = score_model(scorer, state, items)
            _write_cached(model_dir / "probes.json", probe_fp, cached_probes)
            log.info("eval: %s", accuracy_line(spec.name, cached_probes))
            del scorer, state
        probe_results[spec.name] = cached_probes
        records += cached_answers
        scores[spec.name] = cached_scores
        del model
        gc.collect()

    (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    names = [m.name for m in cfg.models]
    perplexity = {
        n: likelihood.perplexity(np.asarray(s["nll"]), np.asarray(s["counts"])) for n, s in scores.items()
    }
    dpo = None
    if pairs:
        ref = scores[_reference_name(cfg)]

        def pair_metrics(s, keep):
            return likelihood.dpo_metrics(
                (np.asarray(s["chosen"])[keep], np.asarray(s["rejected"])[keep]),
                (np.asarray(ref["chosen"])[keep], np.asarray(ref["rejected"])[keep]),
                cfg.likelihood.beta,
            )

        # Cross-persona and cross-stage pairs differ in difficulty (a mirrored cross-stage pair
        # differs only in the stage token), so each source is also reported on its own.
        dpo = {
            n: {
                **pair_metrics(s, np.ones(len(pairs), bool)),
                "reference": _reference_name(cfg),
                "by_source": {src: pair_metrics(s, pair_sources == src) for src in sorted(set(pair_sources))},
            }
            for n, s in scores.items()
        }
    distinction = distinction_bleu(records)
    judge = None
    if cfg.judge.enabled:
        from persllm_jax.evaluation.judge import run_judge

        judge = run_judge(
            records,
            cfg.judge,
            out / "judge_cache",
            persona_names={p.id: p.name for p in personas.values()},
            models=names,
        )
    meta = {
        "held_out_questions": len(items),
        "answers_per_model": len(requests),
        "pairs": len(pairs),
        "dpo_reference": _reference_name(cfg) if pairs else None,
        "judge": f"{cfg.judge.model} at {cfg.judge.base_url}" if cfg.judge.enabled else None,
        "generation": dataclasses.asdict(cfg.generation),
        "wall_time_s": round(time.time() - started, 1),
    }
    probes = (
        {"models": probe_results, "meta": {**probe_set["summary"], "held_out_dialogues": len(items)}}
        if probe_set["probes"]
        else None
    )
    metrics = report.collect_metrics(
        names, distinction=distinction, judge=judge, dpo=dpo, perplexity=perplexity, probes=probes, meta=meta
    )
    run_dirs = {m.name: m.run_dir for m in cfg.models if m.run_dir}
    written = report.write_report(out, metrics, run_dirs=run_dirs, title=cfg.title)
    return {"report": written, "metrics": metrics}
