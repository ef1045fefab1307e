"""Real-token throughput on persona data: our SFT and DPO, packed and unpacked, against TRL's
SFTTrainer (packing, padding-free) and DPOTrainer, on the same model, token budget and dtype, in one run.

Data: built persona data (`dialogues.jsonl` and `pairs.jsonl` of `persllm build-data`; default
`runs/demo/data`, which `bash scripts/demo.sh` makes) and general chats (default
`tests/data/general.jsonl`), mixed as PersLLM mixes them: the persona dialogues five times, the
general chats once (DPO: the pairs once). Model: SmolLM2-135M's shape with `--layers` layers and
random weights, saved once in Hugging Face format, so that every run loads the same weights.

  ours_sft_packed / ours_sft_unpacked   `persllm sft` (its grain input pipeline, packing and step)
  trl_sft_packed                        TRL SFTTrainer, packing=True (best-fit, padding-free)
  ours_dpo_packed / ours_dpo_unpacked   `persllm dpo` with the cached reference (its pass is setup)
  trl_dpo                               TRL DPOTrainer, precomputed reference (setup)

The token budget per step is `--rows` x `--seq` (DPO: `--rows` x 2 x `--seq`: a packed DPO row
holds both sides of its pairs, an unpacked pair takes two rows of `--seq`). TRL SFT gets the
same rows of `--seq`; TRL DPO pads each batch to its longest pair, so it gets batches of as many
pairs as our packed DPO step holds on average (an epoch's last batch holds what is left). Each measurement runs in its own process; reported
are real (non-padding) tokens per second over the timed steps (after `--warmup` steps, which
include compilation), the step time, how full the rows were, and the process's peak RSS.

    python benchmarks/persona_throughput.py                        # 4 layers, 4 x 2048, fp32
    python benchmarks/persona_throughput.py --rows 2 --seq 512 --steps 2 --only ours_sft_packed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = (
    "ours_sft_packed",
    "ours_sft_unpacked",
    "trl_sft_packed",
    "ours_dpo_packed",
    "ours_dpo_unpacked",
    "trl_dpo",
)
RESULT_MARK = "@@persona_throughput-result@@ "
TOKENIZER = ROOT / "tests" / "data" / "tokenizer"
# Targets: packed SFT >= 3x our unpacked and >= TRL's packed; packed DPO >= 2x TRL's DPO.
TARGETS = (
    ("ours_sft_packed", "ours_sft_unpacked", 3.0),
    ("ours_sft_packed", "trl_sft_packed", 1.0),
    ("ours_dpo_packed", "trl_dpo", 2.0),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default=str(ROOT / "runs" / "demo" / "data"), help="built persona data directory"
    )
    p.add_argument("--general", default=str(ROOT / "tests" / "data" / "general.jsonl"), help="general chats")
    p.add_argument(
        "--layers", type=int, default=4, help="SmolLM2-135M's layers to keep (30: the whole model)"
    )
    p.add_argument("--rows", type=int, default=4, help="rows per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (DPO: per side)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (compilation included)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--pairs-per-step", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The shared model, saved once.


def save_model(args, out: Path) -> None:
    """SmolLM2-135M's shape with `--layers` layers, random weights, and the test tokenizer with
    the stage tokens, in Hugging Face format (child process: no JAX in the parent)."""
    code = f"""
import sys, torch, transformers
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from train_throughput_common import model_config_module
mc = model_config_module()
tok = transformers.AutoTokenizer.from_pretrained({str(TOKENIZER)!r})
tok.add_tokens(["<TIME-I>", "<TIME-II>", "<TIME-III>"], special_tokens=True)
cfg = mc.preset("smollm2_135m", num_layers={args.layers}, vocab_size=len(tok))
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(mc.to_hf_config(cfg)).float()
model.save_pretrained({str(out)!r}); tok.save_pretrained({str(out)!r})
print(sum(p.numel() for p in model.parameters()))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print(f"--- model: {int(result.stdout.split()[-1]) / 1e6:.1f}M parameters in {out}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Ours: the real commands.


def run_ours(args, name: str, model_dir: Path, work: Path) -> dict:
    kind = "sft" if "_sft_" in name else "dpo"
    run_dir = work / name
    data = Path(args.data)
    if kind == "sft":
        sources = [
            {"path": str(data / "dialogues.jsonl"), "repeats": 5, "split": "train"},
            {"path": args.general, "repeats": 1},
        ]
    else:
        sources = [{"path": str(data / "pairs.jsonl"), "repeats": 1, "split": "train"}]
    config = {  # JSON is YAML
        "run_dir": str(run_dir),
        "model": {"path": str(model_dir), "remat": "full"},
        "data": {"sources": sources},
        "train": {
            "batch_size": args.rows,
            "seq_len": args.seq,
            "max_steps": args.warmup + args.steps,
            "packing": name.endswith("_packed"),
            "logits_chunk": 512,
        },
        "optim": {"warmup_steps": 0},
        "checkpoint": {"every_steps": 0, "keep": 1},
    }
    config_path = work / f"{name}.yaml"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "persllm_jax.cli", kind, "--config", str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {
            "status": "failed",
            "error": f"exit {code}",
            "stderr_tail": log_path.read_text().splitlines()[-8:],
        }
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if "loss" in r][args.warmup :]
    step = statistics.mean(r["step_time_s"] for r in timed)
    real = statistics.mean(r["tokens"] for r in timed)
    out = {
        "status": "ok",
        "wall_s": wall,
        "mean_step_s": step,
        "real_tokens_per_step": real,
        "tokens_per_s": real / step,
        "row_fill": statistics.mean(r["packing_efficiency"] for r in timed),
        "examples_per_step": statistics.mean(r.get("sequences", r.get("pairs", 0)) for r in timed),
        "losses": [r["loss"] for r in records if "loss" in r],
        "peak_memory_gb": usage.ru_maxrss * 1024 / 1e9,  # Linux reports KiB
    }
    return out


# ---------------------------------------------------------------------------------------------
# TRL: the trainers, in a child process of this script.


def child_trl(args) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    kind = "sft" if args.child.startswith("trl_sft") else "dpo"
    model = transformers.LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    data = Path(args.data)

    def read(path, split=None):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return [r for r in rows if split is None or r.get("split") in (None, split)]

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.training = [], False

        def on_train_begin(self, *_, **__):
            self.training = True

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    steps = args.warmup + args.steps
    common = dict(
        max_steps=steps, gradient_accumulation_steps=1, learning_rate=5e-5, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0, gradient_checkpointing=True,
        bf16=False, use_cpu=not torch.cuda.is_available(), report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out_dir:
        if kind == "sft":
            persona = [{"messages": r["messages"]} for r in read(data / "dialogues.jsonl", "train")]
            general = [{"messages": r["messages"]} for r in read(args.general)]
            dataset = datasets.Dataset.from_list(persona * 5 + general).shuffle(seed=0)
            config = trl.SFTConfig(
                output_dir=out_dir, packing=True, max_length=args.seq, per_device_train_batch_size=args.rows,
                **common,
            )  # fmt: skip
            trainer = trl.SFTTrainer(
                model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
            )
        else:
            keys = ("prompt", "chosen", "rejected")
            pairs = [{k: r[k] for k in keys} for r in read(data / "pairs.jsonl", "train")]
            dataset = datasets.Dataset.from_list(pairs).shuffle(seed=0)
            config = trl.DPOConfig(
                output_dir=out_dir, max_length=args.seq, per_device_train_batch_size=args.pairs_per_step,
                precompute_ref_log_probs=True, precompute_ref_batch_size=args.pairs_per_step, beta=0.1,
                **common,
            )  # fmt: skip
            trainer = trl.DPOTrainer(
                model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
            )
        counted, rows = _count_tokens(trainer, kind, timer)
        trainer.train()
    timed = timer.times[args.warmup :]
    real = counted[args.warmup : steps]
    pairs = [n // 2 for n in rows[args.warmup : steps]]  # a DPO batch holds chosen and rejected rows
    step = statistics.mean(timed)
    return {
        "status": "ok",
        "mean_step_s": step,
        "real_tokens_per_step": statistics.mean(real),
        "tokens_per_s": sum(real) / sum(timed),
        "row_fill": None,
        "examples_per_step": statistics.mean(pairs) if kind == "dpo" else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "peak_memory_gb": _own_peak_rss_gb(),
    }


def _count_tokens(trainer, kind: str, timer) -> tuple[list[int], list[int]]:
    """Real tokens and rows of each batch the trainer trains on (not the reference precompute's),
    counted as its collator makes them: padding-free SFT has no padding; DPO's attention mask marks
    it. (The last batch of an epoch holds the pairs left over, fewer than the batch size.)"""
    counted: list[int] = []
    rows: list[int] = []
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        if timer.training:
            mask = batch.get("attention_mask") if kind == "dpo" else None
            counted.append(int(batch["input_ids"].numel() if mask is None else mask.sum()))
            rows.append(int(batch["input_ids"].shape[0]))
        return batch

    trainer.data_collator = counting
    return counted, rows


def _own_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_trl(args, name: str, model_dir: Path, pairs_per_step: int) -> dict:
    argv = [
        sys.executable, str(Path(__file__).resolve()), f"--child={name}", f"--model-dir={model_dir}",
        f"--data={args.data}", f"--general={args.general}", f"--rows={args.rows}", f"--seq={args.seq}",
        f"--steps={args.steps}", f"--warmup={args.warmup}", f"--pairs-per-step={pairs_per_step}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    results = [line[len(RESULT_MARK) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not results:
        return {
            "status": "failed",
            "error": f"exit {proc.returncode}",
            "stderr_tail": proc.stderr.splitlines()[-8:],
        }
    return {**json.loads(results[-1]), "wall_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# The run and its report.


def report(results: dict, args) -> str:
    lines = [
        f"## Persona-data throughput: SmolLM2-135M shape, {args.layers} layers, {args.rows} rows x {args.seq} "
        f"tokens (DPO: x 2), fp32, remat full / gradient checkpointing",
        "",
        "| run | step (s) | real tokens / step | real tokens/s | rows filled | examples / step | peak RSS (GB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('error', '')} | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['mean_step_s']:.2f} | {r['real_tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{fmt(r['row_fill'], '.1%')} | {fmt(r['examples_per_step'], '.1f')} | {r['peak_memory_gb']:.2f} |"
        )
    lines += ["", "Ratios of real tokens/s:", ""]
    for a, b, target in TARGETS:
        if results.get(a, {}).get("status") == "ok" and results.get(b, {}).get("status") == "ok":
            value = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
            verdict = "met" if value >= target else "MISSED"
            lines.append(f"- {a} / {b}: {value:.2f} (target >= {target:g}: {verdict})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_MARK + json.dumps(child_trl(args)), flush=True)
        return 0
    for needed in (Path(args.data) / "dialogues.jsonl", Path(args.data) / "pairs.jsonl", Path(args.general)):
        if not needed.is_file():
            sys.exit(
                f"{needed} not found: build the persona data first (bash scripts/demo.sh) or give --data"
            )
    names = [n for n in (args.only.split(",") if args.only else MEASUREMENTS) if n]
    unknown = sorted(set(names) - set(MEASUREMENTS))
    if unknown:
        sys.exit(f"--only: unknown {unknown}; valid: {', '.join(MEASUREMENTS)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        save_model(args, model_dir)
        for name in names:
            print(f"--- {name} ...", file=sys.stderr, flush=True)
            if name.startswith("ours"):
                results[name] = run_ours(args, name, model_dir, work)
            else:
                packed_dpo = results.get("ours_dpo_packed", {})
                pairs = round(packed_dpo.get("examples_per_step") or 2 * args.rows)
                results[name] = run_trl(args, name, model_dir, pairs)
            r = results[name]
            summary = (
                f"{r['tokens_per_s']:.0f} real tokens/s"
                if r["status"] == "ok"
                else f"{r.get('error')}\n" + "\n".join(r.get("stderr_tail", []))
            )
            print(f"--- {name}: {summary}", file=sys.stderr, flush=True)
    text = report(results, args)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results, "report": text}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
