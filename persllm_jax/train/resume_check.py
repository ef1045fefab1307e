"""Resuming a run with an edited config: settings that would make it another run are refused,
each named with its old and new value; settings that only change how it runs pass.

The run keeps the config it was started with in `config.yaml`; whenever a resume changes
anything, the config in effect until then is kept under `config_history/` first.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from persllm_jax import configlib
from persllm_jax.train.config import RunConfig

log = logging.getLogger(__name__)

# Changing these does not change what is trained (the same updates, up to float rounding), only
# where and how it runs, how often it logs or saves, and where it stops this time.
HARMLESS = (
    "run_dir",
    "data.sources.paths",
    "train.log_every",
    "train.stop_after",
    "train.allow_config_change",
    "train.logits_chunk",
    "train.grad_accum_steps",
    "checkpoint.",
    "distributed.",
    "mesh.",
    "model.remat",
    "model.attention_impl",
    "eval.with_probes",
    "eval.probes",
    "eval.personas_dir",
)


def flat(config) -> dict:
    """Dotted keys -> values of a config dataclass (lists compared whole). Where the data sources
    are read from is kept apart (`data.sources.paths`, harmless): the data fingerprint checks
    their content, so the same data under another path resumes."""
    out = {}

    def walk(value, prefix):
        if prefix == "data.sources.":
            out["data.sources"] = tuple((s.repeats, s.split) for s in value)
            out["data.sources.paths"] = tuple(s.path for s in value)
        elif dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name), f"{prefix}{field.name}.")
        else:
            out[prefix[:-1]] = value

    walk(config, "")
    return out


def changed_settings(old: RunConfig, new: RunConfig) -> tuple[dict, dict]:
    """(changes that make another run, harmless changes), each key -> (old, new)."""
    before, after = flat(old), flat(new)
    changes = {k: (before.get(k), after.get(k)) for k in sorted(after) if before.get(k) != after.get(k)}
    harmful = {k: v for k, v in changes.items() if not k.startswith(HARMLESS)}
    return harmful, {k: v for k, v in changes.items() if k not in harmful}


def check_and_record(run_dir: Path, cfg: RunConfig, resume_step: int, write: bool) -> None:
    """Refuse a resume whose config makes the run something else (unless
    `train.allow_config_change`), then keep the previous config in the history."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        old = configlib.load(RunConfig, path)
    except configlib.ConfigError as err:
        raise ValueError(f"cannot resume {run_dir}: its {path.name} does not load ({err})") from err
    harmful, harmless = changed_settings(old, cfg)
    if harmful and not cfg.train.allow_config_change:
        lines = "\n".join(f"  {key}: {a!r} -> {b!r}" for key, (a, b) in harmful.items())
        raise ValueError(
            f"cannot resume {run_dir} at step {resume_step}: the config changes settings that make it "
            f"another run:\n{lines}\nuse a new run_dir, restore these values, or pass "
            "train.allow_config_change=true to accept them (the run keeps its earlier configs "
            "under config_history/)"
        )
    if harmful:
        log.warning("resuming with changed settings (train.allow_config_change): %s", sorted(harmful))
    if (harmful or harmless) and write:
        history = run_dir / "config_history"
        history.mkdir(exist_ok=True)
        kept = history / f"until_step_{resume_step}.yaml"
        kept.write_text(path.read_text())
        log.info(
            "config changed on resume (%s); the previous one is kept as %s", sorted(harmful | harmless), kept
        )
