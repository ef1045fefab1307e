"""Bytes per chip of Llama-3 SFT and DPO train steps on TPU pod slices, from `persllm compile`.

Each case runs `persllm compile` (the step `persllm sft|dpo` would build, AOT-compiled for the
slice by libtpu on this machine) and the figures are printed as a Markdown table. A second table
gives the largest global batch that fits for some of them: batches are whole rows per chip, the
bytes for 1 and 2 rows per chip give a linear guess, and compiling the guess and the batch one
row per chip above it proves where the limit is. Compiling a 70B step for 256 chips takes
minutes on a small CPU; `--only` / `--only-largest` pick cases by index, `--reuse` reads the
per-case JSON files of an earlier run instead of compiling again.

    python benchmarks/compile_table.py --reuse --json benchmarks/results/compile_table.json
    python benchmarks/compile_table.py --adapters --json benchmarks/results/compile_adapters.json
    python benchmarks/compile_table.py --families --json benchmarks/results/compile_families.json

`--families`: Qwen3-8B / 32B and Gemma-3-12B / 27B (text), SFT and DPO on v5p-64 and v6e-64, and
their LoRA and QLoRA SFT steps on one 16 GiB v5e chip.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3

# (task, preset, topology, fsdp, batch, seq_len, remat)
CASES = [
    ("sft", "llama3_8b", "v5p:4x4x4", 64, 64, 4096, "full"),
    ("dpo", "llama3_8b", "v5p:4x4x4", 64, 64, 4096, "full"),
    ("sft", "llama3_8b", "v5p:4x4x4", 64, 64, 8192, "full"),
    ("sft", "llama3_8b", "v6e:16x16", 256, 256, 4096, "full"),
    ("sft", "llama3_70b", "v5p:8x8x4", 256, 256, 4096, "full"),
    ("dpo", "llama3_70b", "v5p:8x8x4", 256, 256, 4096, "full"),
    ("sft", "llama3_70b", "v6e:16x16", 256, 256, 4096, "full"),
    ("sft", "llama3_8b", "v5p:4x4x4", 64, 64, 4096, "dots"),
    ("sft", "llama3_8b", "v5p:4x4x4", 64, 64, 4096, "none"),
]

# LoRA (rank 16 on every projection, the frozen base in bf16) and QLoRA (the base's projections in
# NF4), on one v5e chip and on an 8-chip v5e slice (full fine-tuning of 8B needs 16 bytes per
# parameter for weights and AdamW alone, 128 GB):
# (task, preset, topology, fsdp, batch, seq_len, remat, training)
ADAPTER_CASES = [
    ("sft", "llama3_8b", "v5e:1x1", 1, 1, 2048, "full", "lora"),
    ("sft", "llama3_8b", "v5e:1x1", 1, 1, 2048, "full", "qlora"),
    ("dpo", "llama3_8b", "v5e:1x1", 1, 1, 2048, "full", "lora"),
    ("dpo", "llama3_8b", "v5e:1x1", 1, 1, 2048, "full", "qlora"),
    ("sft", "llama3_8b", "v5e:2x4", 8, 8, 4096, "full", "lora"),
    ("sft", "llama3_8b", "v5e:2x4", 8, 8, 4096, "full", "qlora"),
    ("dpo", "llama3_8b", "v5e:2x4", 8, 8, 4096, "full", "lora"),
    ("dpo", "llama3_8b", "v5e:2x4", 8, 8, 4096, "full", "qlora"),
]
TRAINING = {
    "full": [],
    "lora": ["lora.rank=16", "lora.alpha=32", "model.dtype=bfloat16", "dpo.reference=base"],
    "qlora": ["lora.rank=16", "lora.alpha=32", "model.dtype=bfloat16", "dpo.reference=base",
              "lora.base_quantization=nf4"],
}  # fmt: skip

FAMILY_PRESETS = ("qwen3_8b", "qwen3_32b", "gemma3_12b", "gemma3_27b")
FAMILY_CASES = [
    (task, preset, topology, 64, 64, 4096, "full")
    for preset in FAMILY_PRESETS
    for topology in ("v5p:4x4x4", "v6e:8x8")
    for task in ("sft", "dpo")
]
FAMILY_ADAPTER_CASES = [
    ("sft", preset, "v5e:1x1", 1, 1, 2048, "full", training)
    for preset in FAMILY_PRESETS
    for training in ("lora", "qlora")
]

# (task, preset, topology, fsdp, seq_len, remat): the largest batch that fits
LARGEST = [
    ("sft", "llama3_8b", "v5p:4x4x4", 64, 4096, "full"),
    ("sft", "llama3_8b", "v5p:4x4x4", 64, 4096, "dots"),
    ("dpo", "llama3_8b", "v5p:4x4x4", 64, 4096, "full"),
    ("sft", "llama3_70b", "v5p:8x8x4", 256, 4096, "full"),
]


def overrides(preset: str, fsdp: int, batch: int, seq_len: int, remat: str) -> list[str]:
    return [
        f"model.preset={preset}",
        "model.add_tokens=[]",
        "model.compute_dtype=bfloat16",
        f"model.remat={remat}",
        f"mesh.fsdp={fsdp}",
        f"train.batch_size={batch}",
        f"train.seq_len={seq_len}",
        "train.logits_chunk=512",
    ]


def run_case(case, out_dir: Path, reuse: bool = False) -> dict:
    task, preset, topology, fsdp, batch, seq_len, remat, training = (*case, "full")[:8]
    name = f"{task}_{preset}_{topology.replace(':', '_')}_{batch}x{seq_len}_{remat}"
    out = out_dir / (name + ("" if training == "full" else f"_{training}") + ".json")
    if reuse and out.with_suffix(".case.json").is_file():
        return json.loads(out.with_suffix(".case.json").read_text())
    command = [
        sys.executable, "-m", "persllm_jax.cli", "compile", task, "--topology", topology,
        "--config", str(ROOT / "configs" / f"{task}_tiny.yaml"), "--json", str(out),
        *overrides(preset, fsdp, batch, seq_len, remat), *TRAINING[training],
    ]  # fmt: skip
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    report = json.loads(out.read_text())
    projected = next((ln for ln in result.stdout.splitlines() if ln.startswith("projected step time")), "")
    row = {
        "task": task, "model": preset, "topology": topology, "batch": batch, "seq_len": seq_len, "remat": remat,
        "training": training, "compile_s": time.perf_counter() - t0, "projection": projected, **report,
    }  # fmt: skip
    out.with_suffix(".case.json").write_text(json.dumps(row, indent=2) + "\n")
    print(
        f"compiled {case}: {report['total_bytes'] / GiB:.2f} GiB in {row['compile_s']:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def largest_batch(case, out_dir: Path, reuse: bool) -> dict:
    """The largest batch (whole rows per chip) whose step fits, and the next one, which does not."""
    task, preset, topology, fsdp, seq_len, remat = case

    def at(rows: int) -> dict:
        return run_case((task, preset, topology, fsdp, rows * fsdp, seq_len, remat), out_dir, reuse)

    one = at(1)
    if not one["fits"]:
        return {"case": case, "fits": None, "above": one}
    two = at(2)
    if not two["fits"]:
        return {"case": case, "fits": one, "above": two}
    per_row = two["total_bytes"] - one["total_bytes"]
    rows = max(2, 2 + (two["device_memory_bytes"] - two["total_bytes"]) // max(per_row, 1))
    fits = at(rows)
    while not fits["fits"]:
        rows -= 1
        fits = at(rows)
    above = at(rows + 1)
    while above["fits"]:
        rows, fits = rows + 1, above
        above = at(rows + 1)
    return {"case": case, "fits": fits, "above": above}


def table(rows: list[dict]) -> str:
    lines = [
        "| step | model | slice | batch x seq | remat | GiB per chip (args / temp / total) | of | fits | "
        "model FLOPs / step | step time at 50% MFU (projection) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = r["projection"].split(":")[-1].split("(")[0].strip() if r["projection"] else "-"
        lines.append(
            f"| {r['task']} | {r['model']} | {r['topology']} ({r['devices']} chips) | {r['batch']} x {r['seq_len']} "
            f"| {r['remat']} | {r['argument_bytes'] / GiB:.2f} / {r['temp_bytes'] / GiB:.2f} / "
            f"{r['total_bytes'] / GiB:.2f} | {r['device_memory_bytes'] / GiB:.0f} | {'yes' if r['fits'] else 'no'} "
            f"| {r['model_flops_per_step']:.2e} | {seconds} |"
        )
    return "\n".join(lines)


def adapter_table(rows: list[dict]) -> str:
    lines = [
        "| step | model | training | slice | batch x seq | GiB per chip (args / temp / total) | of | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['model']} | {r['training']} | {r['topology']} ({r['devices']} chips) | {r['batch']} x {r['seq_len']} "
            f"| {r['argument_bytes'] / GiB:.2f} / {r['temp_bytes'] / GiB:.2f} / {r['total_bytes'] / GiB:.2f} "
            f"| {r['device_memory_bytes'] / GiB:.0f} | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def largest_table(results: list[dict]) -> str:
    lines = [
        "| step | model | slice | seq | remat | largest batch that fits | GiB per chip there | next batch (GiB per chip) | step time at 50% MFU (projection) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        task, preset, topology, _, seq_len, remat = r["case"]
        fits, above = r["fits"], r["above"]
        seconds = (
            fits["projection"].split(":")[-1].split("(")[0].strip() if fits and fits["projection"] else "-"
        )
        lines.append(
            f"| {task} | {preset} | {topology} ({above['devices']} chips) | {seq_len} | {remat} | "
            f"{fits['batch'] if fits else 'none'} | {fits['total_bytes'] / GiB:.2f} of "
            f"{fits['device_memory_bytes'] / GiB:.0f} | {above['batch']} ({above['total_bytes'] / GiB:.2f}, does not fit) "
            f"| {seconds} |"
            if fits
            else f"| {task} | {preset} | {topology} | {seq_len} | {remat} | none | - | {above['batch']} | - |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated case indices (default: all)")
    parser.add_argument("--only-largest", default="", help="comma-separated largest-batch case indices")
    parser.add_argument("--reuse", action="store_true", help="read cases compiled by an earlier run")
    parser.add_argument("--adapters", action="store_true", help="only the LoRA / QLoRA table")
    parser.add_argument("--families", action="store_true", help="only the Qwen3 and Gemma 3 tables")
    parser.add_argument("--json", default="", help="write every case's figures here")
    parser.add_argument("--out-dir", default="/tmp/persllm_compile_table", help="per-case JSON files")
    args = parser.parse_args()
    picked = [CASES[int(i)] for i in args.only.split(",")] if args.only else CASES
    largest = [LARGEST[int(i)] for i in args.only_largest.split(",")] if args.only_largest else LARGEST
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.families:
        rows = [run_case(case, out_dir, args.reuse) for case in FAMILY_CASES]
        adapters = [run_case(case, out_dir, args.reuse) for case in FAMILY_ADAPTER_CASES]
        print(table(rows))
        print()
        print(adapter_table(adapters))
        if args.json:
            Path(args.json).write_text(json.dumps({"cases": rows, "adapters": adapters}, indent=2) + "\n")
        return 0
    adapters = [run_case(case, out_dir, args.reuse) for case in ADAPTER_CASES]
    if args.adapters:
        print(adapter_table(adapters))
        if args.json:
            Path(args.json).write_text(json.dumps({"adapters": adapters}, indent=2) + "\n")
        return 0
    rows = [run_case(case, out_dir, args.reuse) for case in picked]
    limits = [largest_batch(case, out_dir, args.reuse) for case in largest]
    print(table(rows))
    print()
    print(largest_table(limits))
    print()
    print(adapter_table(adapters))
    if args.json:
        result = {"cases": rows, "largest": limits, "adapters": adapters}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
