"""The training loop shared by `persllm sft` and `persllm dpo`.

What happens, in order: join the other processes (multi-host), build the mesh, restore the latest
checkpoint or load the starting model, build the task (data, and for DPO the cached reference
log-probs), jit one train step with in/out shardings and the state donated, then loop:
dispatch step N, fetch step N-1's metrics while N runs, log, checkpoint when due or when SIGTERM
arrived, stop with a clear message on a NaN or infinite loss. The last step is always saved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax import configlib
from persllm_jax.io import pretrained
from persllm_jax.io.starting_model import load_starting_model, load_tokenizer, portable_recipe
from persllm_jax.io.vocabulary import token_ids
from persllm_jax.model.decoder import CausalLM
from persllm_jax.model.lora import add_adapters, merged_model
from persllm_jax.progress import Progress
from persllm_jax.train import distributed, resume_check
from persllm_jax.train.attempts import Attempt, peak_memory_gib
from persllm_jax.train.checkpointing import Checkpointer
from persllm_jax.train.config import RunConfig
from persllm_jax.train.held_out import HeldOut
from persllm_jax.train.metrics_log import MetricsLog, plot_loss, run_title
from persllm_jax.train.preemption import Preemption
from persllm_jax.train.probing.during_training import METRICS as PROBE_METRICS
from persllm_jax.train.probing.during_training import TrainingProbes
from persllm_jax.train.program import build_program

log = logging.getLogger(__name__)


LORA_ROW_CHOICES = ("added", "none")


def lora_token_rows(cfg: RunConfig, tokenizer) -> tuple[int, ...]:
    """The vocabulary rows a LoRA run trains with its adapters (`lora.train_embeddings_rows`)."""
    if cfg.lora.train_embeddings_rows != "added":
        return ()
    return tuple(token_ids(tokenizer, cfg.model.add_tokens))


def lr_token_rows(cfg: RunConfig, tokenizer) -> tuple[int, ...]:
    """The vocabulary rows `optim.token_lr_multiplier` applies to; each token must be one token of
    the run's vocabulary."""
    if cfg.optim.token_lr_multiplier == 1.0:
        return ()
    tokens = [t.strip() for t in (cfg.optim.token_lr_tokens or cfg.model.add_tokens) if t.strip()]
    if not tokens:
        raise ValueError(
            f"optim.token_lr_multiplier={cfg.optim.token_lr_multiplier} names no rows: set "
            "optim.token_lr_tokens (e.g. the stage tokens) or model.add_tokens"
        )
    vocab = tokenizer.get_vocab()
    unknown = [t for t in tokens if t not in vocab]
    if unknown:
        raise ValueError(f"optim.token_lr_tokens: {unknown} are not tokens of the model's tokenizer")
    return tuple(token_ids(tokenizer, tokens))


class TrainingStopped(RuntimeError):
    """Training cannot go on (a NaN loss, for example); the message says why and where."""


def check_training_settings(cfg: RunConfig) -> None:
    """Settings that would train wrongly rather than fail: refused before anything loads."""
    if cfg.train.grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps must be >= 1, got {cfg.train.grad_accum_steps}")
    if cfg.lora.rank < 0:
        raise ValueError(f"lora.rank must be >= 0 (0: no adapters), got {cfg.lora.rank}")
    if cfg.optim.token_lr_multiplier <= 0:
        raise ValueError(f"optim.token_lr_multiplier must be > 0, got {cfg.optim.token_lr_multiplier}")
    if cfg.optim.token_lr_multiplier != 1.0 and cfg.lora.rank:
        raise ValueError(
            "optim.token_lr_multiplier scales embedding rows of a full fine-tune; a LoRA run trains "
            "the added tokens' rows with its adapters (lora.train_embeddings_rows): use lora.alpha "
            "or optim.lr instead"
        )
    if cfg.lora.train_embeddings_rows not in LORA_ROW_CHOICES:
        raise ValueError(
            f"lora.train_embeddings_rows={cfg.lora.train_embeddings_rows!r}; valid: {', '.join(LORA_ROW_CHOICES)}"
        )
    if cfg.model.dtype != "float32" and not cfg.lora.rank:
        raise ValueError(
            f"model.dtype={cfg.model.dtype}: training keeps its parameters and optimizer state in "
            "model.dtype, and an AdamW update smaller than a bfloat16 weight's resolution would be "
            "lost; train with model.dtype=float32 and model.compute_dtype=bfloat16 (fp32 master "
            "weights, bf16 matmuls), or train LoRA adapters (lora.rank > 0: they are float32 whatever "
            "the frozen base's dtype)"
        )
    if cfg.lora.base_quantization != "none" and not cfg.lora.rank:
        raise ValueError(
            f"lora.base_quantization={cfg.lora.base_quantization} quantizes a frozen base: it needs "
            "lora.rank > 0 (only the adapters train)"
        )
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.lora.dropout and not cfg.lora.rank:
        raise ValueError(f"lora.dropout={cfg.lora.dropout} drops the adapters' input: it needs lora.rank > 0")


def check_batch_layout(cfg: RunConfig, mesh) -> None:
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % accum:
        raise ValueError(f"train.batch_size {batch} is not divisible by train.grad_accum_steps {accum}")
    micro = batch // accum
    if micro % data_parallel:
        raise ValueError(
            f"micro-batch size {micro} (train.batch_size {batch} / grad_accum_steps {accum}) is not "
            f"divisible by the data-parallel size data x fsdp = {mesh.shape['data']} x "
            f"{mesh.shape['fsdp']} = {data_parallel}"
        )


def model_options(cfg: RunConfig) -> dict:
    """The ModelConfig fields a run config sets over the model it starts from."""
    m = cfg.model
    return dict(
        param_dtype=m.dtype, compute_dtype=m.compute_dtype, remat=m.remat, attention_impl=m.attention_impl
    )


def load_initial_model(cfg: RunConfig, mesh) -> tuple[CausalLM, object]:
    """The model training starts from (see `io/starting_model.py`), with the run's LoRA adapters."""
    model, tokenizer = load_starting_model(
        dataclasses.asdict(cfg.model), mesh, quantize=cfg.lora.base_quantization
    )
    if model.cfg.lora_rank:  # a LoRA run to start from: its adapters become part of the base
        model = merged_model(model)
    if cfg.lora.rank:
        lora = cfg.lora
        rows = lora_token_rows(cfg, tokenizer)
        model = add_adapters(
            model, lora.rank, lora.alpha, tuple(lora.targets), seed=lora.seed, mesh=mesh, token_rows=rows,
            base_quantization=lora.base_quantization, dropout=lora.dropout,
        )  # fmt: skip
    return model, tokenizer


def train(cfg: RunConfig, make_task: Callable) -> Path:
    """Run (or resume) training; returns the run directory."""
    check_training_settings(cfg)
    distributed.initialize(cfg.distributed)
    mesh = distributed.build_mesh(cfg.mesh)
    check_batch_layout(cfg, mesh)
    run_dir = Path(cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    with Attempt(run_dir, enabled=is_main) as attempt:
        return _train(cfg, make_task, mesh, run_dir, attempt)


def _train(cfg: RunConfig, make_task: Callable, mesh, run_dir: Path, attempt: Attempt) -> Path:
    is_main = jax.process_index() == 0
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.every_steps)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        resume_check.check_and_record(run_dir, cfg, resume_step, write=is_main)
    options = model_options(cfg)

    if resume_step is None:
        model, tokenizer = load_initial_model(cfg, mesh)
        model_cfg = model.cfg
        _, params = nnx.split(model)
        if is_main:
            # A LoRA run's checkpoints hold only the adapters; the recipe rebuilds the base.
            base = portable_recipe(dataclasses.asdict(cfg.model)) if model_cfg.lora_rank else None
            pretrained.write_model_meta(
                run_dir,
                model_cfg,
                pretrained.source_config(model),
                pretrained.generation_config(model),
                base=base,
            )
            tokenizer.save_pretrained(run_dir / "tokenizer")
        initial_params = params
    else:
        saved_cfg, _ = pretrained.read_model_meta(run_dir)
        model_cfg = saved_cfg.replace(**options)
        tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
        params = None

        def initial_params():  # only DPO needs the starting weights again, and only without a cache
            return nnx.split(load_initial_model(cfg, mesh)[0])[1]

    if is_main:
        configlib.dump(cfg, run_dir / "config.yaml")

    program = build_program(cfg, model_cfg, mesh, lr_token_rows(cfg, tokenizer))
    checkpointer.trainable = program.trainable

    with jax.set_mesh(mesh):
        task = make_task(
            cfg=cfg,
            tokenizer=tokenizer,
            model_cfg=model_cfg,
            graphdef=program.graphdef,
            mesh=mesh,
            run_dir=run_dir,
            initial_params=initial_params,
            params_shardings=program.params_shardings,
        )
        if resume_step is None:
            state = program.init_state(params)
            del params, initial_params
        else:
            state, data, rows = checkpointer.restore(resume_step, program.abstract_state(), initial_params)
            state = state.replace(
                step=jax.device_put(jnp.asarray(data["step"], jnp.int32), program.shardings.step)
            )
            task.check_resume(data)
            task.restore_data_state(rows)
            log.info("resumed from step %d in %s", resume_step, checkpointer.directory)

        step_fn = program.jit_step(task.loss_fn, task.batch_shardings, task.frozen_shardings)
        held_out = HeldOut(task, program.graphdef, mesh) if task.eval_data is not None else None
        probes = TrainingProbes.create(cfg, task, program.graphdef)
        try:
            _loop(cfg, state, step_fn, task, checkpointer, run_dir, resume_step, held_out, attempt, probes)
        finally:
            task.close()
    checkpointer.close()
    if is_main:
        png = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", run_title(task.name, run_dir))
        log.info("run directory %s%s", run_dir, f" (loss curve {png})" if png else "")
    return run_dir


PROBE_KEYS = tuple(f"eval/probes/{m}" for m in PROBE_METRICS)


def _loop(
    cfg, state, step_fn, task, checkpointer, run_dir, resume_step, held_out=None, attempt=None, probes=None
) -> None:
    is_main = jax.process_index() == 0
    metrics_log = MetricsLog(run_dir, enabled=is_main, resume_step=resume_step)
    start, max_steps = int(jax.device_get(state.step)), cfg.train.max_steps
    bar = Progress(max_steps, f"{task.name} steps", unit="step", initial=start, disable=not is_main)
    pending = None  # (step, metrics, dispatch time) of the step whose metrics are not fetched yet
    last_time = time.perf_counter()
    cut = {"rows": 0.0, "seen": 0.0}  # sequences (DPO: pairs) longer than seq_len / trained, this invocation
    unit = "pairs" if task.name == "dpo" else "sequences"

    def flush():
        nonlocal pending, last_time
        if pending is None:
            return
        step, metrics = pending
        pending = None
        values = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        loss = float(values["loss"])
        if not math.isfinite(loss):
            last = checkpointer.latest_step()
            where = f"step {last} in {checkpointer.directory}" if last is not None else "none yet"
            raise TrainingStopped(
                f"loss is {loss} at step {step}; stopping (lower optim.lr or check the data). "
                f"Last checkpoint: {where}"
            )
        now = time.perf_counter()
        elapsed, last_time = now - last_time, now
        record = {"step": step, **task.metrics_record(values)}
        record["tokens_per_s"] = float(values["tokens"]) / elapsed if elapsed > 0 else 0.0
        record["step_time_s"] = elapsed
        if record.get("truncated", 0) > 0:
            if cut["rows"] == 0:
                log.warning(
                    "step %d: %d of %d %s were longer than train.seq_len=%d and were cut (the longest "
                    "so far has %d tokens); raise train.seq_len to train on their ends",
                    step, record["truncated"], record[unit], unit, cfg.train.seq_len, task.longest_seen,
                )  # fmt: skip
            cut["rows"] += record["truncated"]
        cut["seen"] += record[unit]
        if step % max(cfg.train.log_every, 1) == 0 or step == max_steps:
            metrics_log.write(record)
        peak = peak_memory_gib()
        bar.set_postfix(
            loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", peak_memory=f"{peak:.2f} GiB"
        )
        bar.update(1)
        if attempt is not None:
            attempt.step_done(step)

    def evaluate(step: int) -> None:
        nonlocal last_time
        began = time.perf_counter()
        record = {"step": step, **(held_out.run(state.params) if held_out is not None else {})}
        if probes is not None:
            record.update(probes.run(state.params))
        metrics_log.write(record)
        shown = {k: v for k, v in record.items() if k in ("eval/loss", *PROBE_KEYS) and v is not None}
        log.info(
            "step %d: %s (%.1f s)",
            step,
            ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
            time.perf_counter() - began,
        )
        last_time += time.perf_counter() - began  # the next step's time is its own

    every = cfg.eval.every_steps
    try:
        with Preemption() as preemption:
            evaluating = held_out is not None or probes is not None
            if evaluating and start == 0:
                evaluate(0)
            for step in range(start, max_steps):
                batch = task.global_batch(step)
                state, metrics = step_fn(state, batch, task.frozen)
                flush()
                pending = (step + 1, metrics)
                if evaluating and ((step + 1) % every == 0 or step + 1 == max_steps):
                    flush()
                    evaluate(step + 1)
                stop = preemption.reached(step + 1) or (step + 1) == cfg.train.stop_after
                if checkpointer.due(step + 1, max_steps) or stop:
                    flush()
                    checkpointer.save(step + 1, state, task.data_position(step + 1), task.data_state())
                if stop:
                    log.warning("stopped after step %d (checkpoint saved); run again to resume", step + 1)
                    break
            flush()
        if cut["seen"] and is_main:
            seen = cut["seen"]
            log.log(
                logging.WARNING if cut["rows"] else logging.INFO,
                "truncation: %d of %d %s trained on in this run (%.1f%%) were longer than train.seq_len=%d "
                "and were cut; the longest had %d tokens",
                cut["rows"], seen, unit, 100 * cut["rows"] / seen, cfg.train.seq_len, task.longest_seen,
            )  # fmt: skip
    finally:
        bar.close()
        metrics_log.close()
        checkpointer.wait()
