"""Persona probes: what `persllm probe` costs, against scoring every choice as a whole sequence.

Three models (by default SmolLM2-135M-Instruct from the offline GGUF, three times: the cost does not
depend on the weights; or `--models name=path ...`, e.g. the demo's base, sft and dpo) on the
example personas' probe sets, with the other stage's pass of every twin probe:

- `persllm probe` as a user runs it (`probe_models`, in this process): loading, compiling, scoring,
  the metrics; each system message runs once per batch for its prompts, each prompt once for its
  choices, and a twin's other-stage pass is its twin's own pass;
- peer 1, our model without sharing (first model): every (probe, stage, choice) as one whole row
  (prompt and reply) through the same jitted forward, batches of 16 rows;
- peer 2, transformers (first model): the same whole rows through the PyTorch model, batches of 16.

Both peers score exactly the rows `persllm probe` scores (their mean log-probs are compared), so
the times compare like for like.

    python benchmarks/probe_speed.py
    python benchmarks/probe_speed.py --models base=runs/demo/base_model sft=runs/demo/sft dpo=runs/demo/dpo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 16


def whole_rows(tokenizer, personas_dir: Path):
    """Every (probe, stage, choice) `persllm probe` scores, as (prompt + reply ids, reply start)."""
    from persllm_jax.personas.materials import load_personas
    from persllm_jax.personas.probes import persona_probe_files, read_probes
    from persllm_jax.train.probing.scorer import encode_probes

    personas = {p.id: p for p in load_personas(personas_dir)}
    probes = read_probes(persona_probe_files(personas_dir, personas), personas.values())
    encoded = encode_probes(tokenizer, probes, personas)
    return [(list(e.prompt) + list(e.reply), len(e.prompt)) for e in encoded.values()], len(probes)


def padded(rows, start, pad_id):
    chunk = rows[start : start + BATCH]
    width = max(len(ids) for ids, _ in chunk)
    ids = np.full((BATCH, width), pad_id, np.int32)
    mask = np.zeros((BATCH, width), bool)
    for i, (row, _) in enumerate(chunk):
        ids[i, : len(row)], mask[i, : len(row)] = row, True
    return chunk, ids, mask


def mean_logps(logps_row, row, reply_start) -> float:
    return float(np.mean([logps_row[t - 1, row[t]] for t in range(reply_start, len(row))]))


def ours_whole_rows(model, tokenizer, rows) -> tuple[float, list[float]]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def logps(state, ids, mask):
        logits = nnx.merge(graphdef, state)(ids, mask)
        return jax.nn.log_softmax(logits, -1)

    pad = tokenizer.pad_token_id or 0
    began, scores = time.perf_counter(), []
    for start in range(0, len(rows), BATCH):
        chunk, ids, mask = padded(rows, start, pad)
        out = np.asarray(logps(state, jnp.asarray(ids), jnp.asarray(mask)))
        scores += [mean_logps(out[i], row, s) for i, (row, s) in enumerate(chunk)]
    return time.perf_counter() - began, scores


def transformers_whole_rows(path: str, rows) -> tuple[float, list[float]]:
    import torch
    import transformers

    from persllm_jax.io import pretrained
    from tests.hf_fixtures import gguf_to_hf_dir

    source = Path(path)
    if source.suffix == ".gguf":
        source = gguf_to_hf_dir(source, Path("/tmp/probe_speed_hf"))
    elif not (source / "config.json").is_file() or "model_type" not in json.loads(
        (source / "config.json").read_text()
    ):
        model, tokenizer = pretrained.load_pretrained(source)  # a persllm model or run: its HF export
        source = pretrained.save_pretrained(model, tokenizer, Path("/tmp/probe_speed_hf"))

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    began, scores = time.perf_counter(), []
    with torch.no_grad():
        for start in range(0, len(rows), BATCH):
            chunk, ids, mask = padded(rows, start, 0)
            logits = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
            out = torch.log_softmax(logits.float(), -1).numpy()
            scores += [mean_logps(out[i], row, s) for i, (row, s) in enumerate(chunk)]
    return time.perf_counter() - began, scores


def main() -> None:
    from persllm_jax.io import offline_models

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="NAME=PATH (default: the offline SmolLM2 three times)")
    parser.add_argument("--personas-dir", default=str(ROOT / "examples" / "personas"))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    gguf = str(offline_models.smollm2_gguf())
    models = (
        [tuple(m.split("=", 1)) for m in args.models]
        if args.models
        else [(f"smollm2_{i}", gguf) for i in (1, 2, 3)]
    )

    from persllm_jax.evaluation.probes.run import probe_models

    began = time.perf_counter()
    result = probe_models(models, personas_dir=args.personas_dir)
    probe_s = time.perf_counter() - began
    ours = {name: r["probes"] for name, r in result["models"].items()}

    import jax.numpy as jnp

    from persllm_jax.io import pretrained

    print(f"persllm probe: {probe_s:.1f} s for {len(models)} models", flush=True)
    first_name, first_path = models[0]
    model, tokenizer = pretrained.load_pretrained(first_path, dtype=jnp.float32)
    rows, n_probes = whole_rows(tokenizer, Path(args.personas_dir))
    whole_s, whole_scores = ours_whole_rows(model, tokenizer, rows)
    print(f"whole rows, ours: {whole_s:.1f} s for {first_name}", flush=True)
    torch_s, torch_scores = transformers_whole_rows(first_path, rows)
    # The three agree on every score (a check that the peers did the same work).
    flat = [
        s
        for r in ours[first_name]
        for s in [*r["scores"], *(x for o in r.get("other_stage", {}).values() for x in o["scores"])]
    ]
    agree = {
        "whole rows (ours) vs probe": float(np.max(np.abs(np.sort(whole_scores) - np.sort(flat)))),
        "transformers vs whole rows (ours)": float(np.max(np.abs(np.asarray(torch_scores) - whole_scores))),
    }
    tokens = sum(len(r) for r, _ in rows)
    figures = {
        "models": len(models),
        "probes": n_probes,
        "scored_rows_per_model": len(rows),
        "whole_row_tokens_per_model": tokens,
        "persllm_probe_s_all_models": round(probe_s, 1),
        "whole_rows_ours_s_first_model": round(whole_s, 1),
        "whole_rows_transformers_s_first_model": round(torch_s, 1),
        "max_abs_score_difference": agree,
        "accuracy": {name: r["accuracy"]["overall"]["value"] for name, r in result["models"].items()},
    }
    print(json.dumps(figures, indent=1))
    print(
        f"\n{len(models)} models x {n_probes} probes ({len(rows)} scored replies each, twins' other stage "
        f"included): persllm probe {probe_s:.1f} s in all (loading and compiling included); whole rows: ours "
        f"{whole_s:.1f} s for one model (scoring only), transformers {torch_s:.1f} s for one model"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
