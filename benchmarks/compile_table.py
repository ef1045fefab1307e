"""Bytes per chip of Llama-3 SFT and DPO train steps on TPU pod slices, from `persllm compile`.

Each case runs `persllm compile` (the step `persllm sft|dpo` would build, AOT-compiled for the
slice by libtpu on this machine) and the figures are printed as a Markdown table. Compiling a 70B
step for 256 chips takes minutes on a small CPU; `--only` picks cases by index.

    python benchmarks/compile_table.py --json benchmarks/results/compile_table.json
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


def run_case(case, out_dir: Path) -> dict:
    task, preset, topology, fsdp, batch, seq_len, remat = case
    out = out_dir / f"{task}_{preset}_{topology.replace(':', '_')}_{batch}x{seq_len}_{remat}.json"
    command = [
        sys.executable, "-m", "persllm_jax.cli", "compile", task, "--topology", topology,
        "--config", str(ROOT / "configs" / f"{task}_tiny.yaml"), "--json", str(out),
        *overrides(preset, fsdp, batch, seq_len, remat),
    ]  # fmt: skip
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    report = json.loads(out.read_text())
    projected = next((ln for ln in result.stdout.splitlines() if ln.startswith("projected step time")), "")
    return {
        "task": task, "model": preset, "topology": topology, "batch": batch, "seq_len": seq_len, "remat": remat,
        "compile_s": time.perf_counter() - t0, "projection": projected, **report,
    }  # fmt: skip


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated case indices (default: all)")
    parser.add_argument("--json", default="", help="write every case's figures here")
    parser.add_argument("--out-dir", default="/tmp/persllm_compile_table", help="per-case JSON files")
    args = parser.parse_args()
    picked = [CASES[int(i)] for i in args.only.split(",")] if args.only else CASES
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in picked:
        rows.append(run_case(case, out_dir))
        print(f"done {case} in {rows[-1]['compile_s']:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
