"""Training throughput: our SFT and DPO steps against a minimal JAX step and TRL, on one model shape.

Five measurements, each in its own child process (so that peak memory is per measurement):

  ours_sft     our real train step (`make_train_step` + `sft_loss`, chunked loss, scanned layers),
               jitted exactly as `persllm_jax.train.loop` jits it (in/out shardings, state donated),
               on random weights and a random token batch with every target trained
  ours_dpo     our DPO step with cached reference log-probs (`dpo_batch_loss`, reference=None),
               batch/2 pairs, so the number of sequences equals SFT's
  minimal_jax  the framework-free ceiling: our CausalLM forward, plain cross-entropy on
               materialized logits, optax.adamw, donated buffers, same remat setting
  trl_sft      TRL's SFTTrainer on the same shape (LlamaForCausalLM, random init), full rows
  trl_dpo      TRL's DPOTrainer, batch/2 pairs, precompute_ref_log_probs=True (precompute excluded)
  ours_sft_lora  our SFT step training LoRA adapters (rank --lora-rank on every projection; the
               frozen base in the run's dtype), against
  trl_sft_lora TRL's SFTTrainer with a PEFT LoraConfig of the same rank, alpha and targets

For each: mean step time after warm-up, tokens/s, peak memory (CPU: peak RSS of the process; GPU:
the framework's peak device allocation), and MFU = model FLOPs per step (training FLOPs per token
x tokens per step; for DPO the policy's forward and backward on all sequences) / the device's
measured peak matmul FLOP/s in the run's dtype (one jitted JAX matmul, best of several).

    python benchmarks/train_throughput.py                           # smollm2_135m, 8 x 512, fp32
    python benchmarks/train_throughput.py --batch 2 --seq 128 --steps 2
    python benchmarks/train_throughput.py --only ours_sft,minimal_jax --json out.json
    python benchmarks/train_throughput.py --model llama3_1b --attention cudnn   # GPU; bf16 default

A measurement whose estimated memory exceeds what the machine has is skipped with a message
(`--force` runs it anyway). The parent process imports only the standard library, so the children's
peak RSS does not inherit a large parent's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

# This file is the command line, the parent that runs each measurement in a child process (this
# same script with --child) and the report; the children's code is in the sibling modules, found
# because Python puts this script's folder first on sys.path. Like this file, they import only the
# standard library at module level, so that the parent's RSS stays small and the TRL children
# never load JAX.
from train_throughput_common import wait_idle
from train_throughput_jax import child_minimal, child_ours, child_probe
from train_throughput_trl import child_probe_torch, child_trl

MEASUREMENTS = ("ours_sft", "ours_dpo", "minimal_jax", "trl_sft", "trl_dpo", "ours_sft_lora", "trl_sft_lora")
MODELS = ("smollm2_135m", "llama3_1b", "llama3_8b", "tiny")
RESULT_MARK = "@@train_throughput-result@@ "
GB = 1e9
# Targets: ours_sft / minimal_jax step time, ours_dpo / ours_sft step time, ours / TRL peak memory.
TARGET_SFT_VS_MINIMAL = 1.10
TARGET_DPO_VS_SFT = 1.15
TARGET_MEMORY_VS_TRL = 1 / 3
BUSY = 0.05  # a step during which other processes used more of the CPU than this is disturbed


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", choices=MODELS, help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (DPO: batch/2 pairs)")
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="compute dtype (parameters stay fp32; TRL: bf16=True autocast). auto: bfloat16 for "
        "llama3_1b / llama3_8b on GPU, float32 otherwise",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (after compilation)")
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"), help="our remat policy")
    p.add_argument(
        "--attention", default="xla", choices=("xla", "cudnn"), help="our attention_impl (cudnn: GPU only)"
    )
    p.add_argument("--logits-chunk", type=int, default=512, help="our loss's positions per logits chunk")
    p.add_argument(
        "--lora-rank", type=int, default=16, help="the *_lora measurements' rank (alpha: 2 x rank)"
    )
    p.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="turn on TRL's gradient checkpointing (off by default here; TRL's own default is on)",
    )
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    p.add_argument("--force", action="store_true", help="run measurements estimated not to fit in memory")
    p.add_argument("--quiet", action="store_true", help="do not echo the children's stderr")
    p.add_argument("--child-timeout", type=float, default=0, help="seconds per child (0 = no limit)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="before each measurement, wait up to this many seconds for the host CPU to be idle (Linux)",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        p.error(f"--batch {args.batch}: needs an even number >= 2 (DPO uses batch/2 pairs)")
    if args.steps < 1 or args.warmup < 0 or args.seq < 8:
        p.error("--steps must be >= 1, --warmup >= 0, --seq >= 8")
    return args


def selected(args) -> list[str]:
    if not args.only:
        return list(MEASUREMENTS)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        sys.exit(f"--only: unknown measurement(s) {unknown}; valid: {', '.join(MEASUREMENTS)}")
    return names


def child_argv(args, name: str, dtype: str) -> list[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--model={args.model}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--dtype={dtype}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--remat={args.remat}",
        f"--attention={args.attention}",
        f"--logits-chunk={args.logits_chunk}",
        f"--lora-rank={args.lora_rank}",
        f"--child={name}",
    ]
    if args.trl_gradient_checkpointing:
        argv.append("--trl-gradient-checkpointing")
    return argv


# ---------------------------------------------------------------------------------------------
# Child: the measurement this process was started for.


def run_child(args) -> dict:
    if args.child == "probe":
        return child_probe(args)
    if args.child == "probe_torch":
        return child_probe_torch(args)
    lora = args.lora_rank if args.child.endswith("_lora") else 0
    if args.child in ("ours_sft", "ours_dpo", "ours_sft_lora"):
        return child_ours(args, args.child.split("_")[1], lora_rank=lora)
    if args.child == "minimal_jax":
        return child_minimal(args)
    if args.child in ("trl_sft", "trl_dpo", "trl_sft_lora"):
        return child_trl(args, args.child.split("_")[1], lora_rank=lora)
    raise ValueError(f"unknown child {args.child!r}")


# ---------------------------------------------------------------------------------------------
# Parent: run the children, estimate memory, report.


def spawn(args, name: str, dtype: str) -> dict:
    """Run one child; its JSON result, or {'status': 'failed', 'error': ...}."""
    if args.wait_idle > 0:
        wait_idle(args.wait_idle)
    print(f"--- {name} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen(
        child_argv(args, name, dtype), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    tail: deque[str] = deque(maxlen=30)

    def pump_stderr():
        for line in proc.stderr:
            tail.append(line.rstrip())
            if not args.quiet:
                sys.stderr.write(f"[{name}] {line}")
                sys.stderr.flush()

    pump = threading.Thread(target=pump_stderr, daemon=True)
    pump.start()
    start = time.perf_counter()
    try:
        stdout, _ = proc.communicate(timeout=args.child_timeout or None)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        return {"status": "failed", "error": f"timed out after {args.child_timeout:.0f} s"}
    pump.join(timeout=5)
    wall = time.perf_counter() - start
    results = [line[len(RESULT_MARK) :] for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not results:
        why = f"exit code {proc.returncode}"
        if proc.returncode in (-9, 137):
            why += " (SIGKILL: likely out of memory)"
        return {"status": "failed", "error": why, "stderr_tail": list(tail)[-8:], "wall_s": wall}
    return {"status": "ok", "wall_s": wall, **json.loads(results[-1])}


def estimate_bytes(name: str, cfg: dict, args, dtype: str) -> float:
    """A rough training-memory estimate, to skip what cannot fit rather than swap or be killed."""
    params = cfg["num_params"]
    act = 2 if dtype == "bfloat16" else 4
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers, heads = cfg["num_layers"], cfg["num_heads"]
    tokens = args.batch * args.seq
    state = 16.0 * params  # fp32 parameters, gradients, two Adam moments
    if name.endswith("_lora"):
        state = 4.0 * params  # the frozen base; the adapters' share is small
    per_layer = tokens * (10 * d + 4 * f) * act  # what one layer keeps for its backward pass
    if name.startswith("trl"):
        state += (2.0 * params) if dtype == "bfloat16" else 0.0  # autocast's weight copies
        remat = args.trl_gradient_checkpointing
        logits = tokens * 4096 * 4.0  # the fused head's chunks (small)
    else:
        if args.attention == "xla":
            per_layer += args.batch * heads * args.seq**2 * (4 + act)
        remat = args.remat != "none"
        rows = tokens if name == "minimal_jax" else args.batch * min(args.logits_chunk, args.seq)
        logits = 3.0 * rows * v * 4
    activations = layers * tokens * d * act + per_layer if remat else layers * per_layer
    return state + activations + logits + 1.0 * GB  # + the runtime's own


def derive(result: dict, probe: dict, warmup: int) -> None:
    if result.get("status") != "ok":
        return
    timed = result["step_times_s"][warmup:] or result["step_times_s"]
    if result.get("step_other_load"):
        others = result["step_other_load"][-len(timed) :]
        result["timing_disturbed"] = any(o is not None and o > BUSY for o in others)
    else:
        others = [None] * len(timed)
        result["timing_disturbed"] = (result.get("other_cpu_load") or 0) > BUSY
    clean = [t for t, o in zip(timed, others) if o is not None and o <= BUSY]
    if result["timing_disturbed"] and clean:  # a shared host: average the undisturbed steps
        result["clean_steps"] = f"{len(clean)} of {len(timed)}"
        result["timing_disturbed"], timed = False, clean
    step = statistics.mean(timed)
    result["mean_step_s"] = step
    result["tokens_per_s"] = result["tokens_per_step"] / step
    result["model_flops_per_step"] = probe["flops_per_token"] * result["tokens_per_step"]
    result["mfu"] = result["model_flops_per_step"] / step / probe["peak_flops"]
    result["peak_memory_gb"] = result["peak_memory_bytes"] / GB
    if not all(math.isfinite(x) for x in result.get("losses", [])):
        result["note"] = "non-finite loss"


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def report(results: dict, probe: dict, torch_probe: dict | None, args) -> str:
    cpu = probe["platform"] == "cpu"
    lines = [
        f"## Train throughput: {args.model}, batch {args.batch} x seq {args.seq}, {probe['dtype']}, "
        f"remat {args.remat}, attention {args.attention}",
        "",
        f"Device: {probe['device_kind']} x{probe['num_devices']} ({probe['platform']}), JAX {probe['jax_version']}; "
        f"peak matmul {probe['peak_flops'] / 1e12:.3f} TFLOP/s ({probe['peak_matmul']}, JAX)"
        + (
            f"; torch {torch_probe['torch_version']} matmul {torch_probe['torch_peak_flops'] / 1e12:.3f} TFLOP/s"
            if torch_probe and torch_probe.get("status") == "ok"
            else ""
        ),
        f"Model: {probe['num_params'] / 1e6:.1f}M parameters, {probe['flops_per_token'] / 1e9:.3f} GFLOP "
        f"per trained token (fwd+bwd); {args.warmup} warm-up + {args.steps} timed steps",
        "",
        "| run | step (s) | tokens/s | peak mem (GB) | base mem (GB) | MFU | compile / setup (s) "
        + ("| process CPU s/step " if cpu else "")
        + "| notes |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---|",
    ]
    for name, r in results.items():
        if r.get("status") != "ok":
            dashes = "| - " * (7 if cpu else 6)
            lines.append(f"| {name} {dashes}| {r.get('status')}: {r.get('error', '')} |")
            continue
        base = r.get("base_memory_bytes")
        compile_setup = f"{fmt(r.get('compile_s'), '.1f')} / {r['setup_s']:.1f}"
        notes = []
        if name.startswith("trl"):
            notes.append(f"{r['attention']}, {r['optimizer'].split('.')[-1].lower()}")
            notes.append("grad ckpt" if r["gradient_checkpointing"] else "no grad ckpt")
            if name == "trl_dpo":
                notes.append("setup incl. ref precompute")
        if "xla_memory" in r:
            notes.append(f"XLA temp {r['xla_memory']['temp'] / GB:.2f} GB")
        if r.get("clean_steps"):
            notes.append(f"mean of the {r['clean_steps']} steps that other processes left alone")
        elif r.get("timing_disturbed") or (r.get("other_cpu_load") or 0) > BUSY:
            notes.append(f"timing disturbed: other processes used {r['other_cpu_load']:.0%} of the CPU")
        if r.get("note"):
            notes.append(r["note"])
        lines.append(
            f"| {name} | {r['mean_step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_memory_gb']:.2f} | "
            f"{fmt(base and base / GB, '.2f')} | {r['mfu'] * 100:.1f}% | {compile_setup} | "
            + (f"{fmt(r.get('cpu_s_per_step'), '.1f')} | " if cpu else "")
            + f"{'; '.join(notes)} |"
        )
    lines += ["", "Ratios:", ""]

    def ok(name):
        return results.get(name, {}).get("status") == "ok"

    def ratio(label, a, b, key, target=None):
        if not (ok(a) and ok(b)):
            return
        value = results[a][key] / results[b][key]
        verdict = ""
        if target is not None:
            verdict = f" (target <= {target:.2f}: {'met' if value <= target else 'MISSED'})"
        busy = [n for n in (a, b) if results[n].get("timing_disturbed")]
        if busy and key in ("mean_step_s", "tokens_per_s"):
            verdict += f" [timing of {', '.join(busy)} disturbed by other processes]"
        lines.append(f"- {label}: {value:.3f}{verdict}")

    before = len(lines)
    ratio("ours_sft / minimal_jax step time", "ours_sft", "minimal_jax", "mean_step_s", TARGET_SFT_VS_MINIMAL)
    ratio("ours_dpo / ours_sft step time", "ours_dpo", "ours_sft", "mean_step_s", TARGET_DPO_VS_SFT)
    if cpu and all(results.get(n, {}).get("cpu_s_per_step") for n in ("ours_sft", "minimal_jax", "ours_dpo")):
        ratio("ours_sft / minimal_jax process CPU time", "ours_sft", "minimal_jax", "cpu_s_per_step")
        ratio("ours_dpo / ours_sft process CPU time", "ours_dpo", "ours_sft", "cpu_s_per_step")
    ratio("ours_sft_lora / ours_sft step time", "ours_sft_lora", "ours_sft", "mean_step_s")
    ratio("ours_sft_lora / ours_sft peak memory", "ours_sft_lora", "ours_sft", "peak_memory_bytes")
    for ours, trl in (("ours_sft", "trl_sft"), ("ours_dpo", "trl_dpo"), ("ours_sft_lora", "trl_sft_lora")):
        ratio(f"{ours} / {trl} step time", ours, trl, "mean_step_s")
        ratio(f"{ours} / {trl} tokens/s", ours, trl, "tokens_per_s")
        ratio(f"{ours} / {trl} peak memory", ours, trl, "peak_memory_bytes", TARGET_MEMORY_VS_TRL)
    if len(lines) == before:
        lines.append("- none: they need pairs of measurements that both ran")
    if cpu:
        lines += [
            "",
            "CPU peak memory is the process's peak RSS (libraries, compiler and runtime included); "
            "'base mem' is that RSS right after the imports. Process CPU s/step is the CPU time of all "
            "the process's threads per timed step, which other processes on the host disturb less "
            "than wall time.",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        try:
            result = run_child(args)
        except Exception as err:  # the parent reports it; the traceback went to stderr
            import traceback

            traceback.print_exc()
            print(RESULT_MARK + json.dumps({"status": "failed", "error": f"{type(err).__name__}: {err}"}))
            return 1
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    names = selected(args)
    probe = spawn(args, "probe", args.dtype)
    if probe.get("status") != "ok":
        sys.exit(f"device probe failed: {probe.get('error')}\n" + "\n".join(probe.get("stderr_tail", [])))
    dtype = probe["dtype"]
    if args.attention == "cudnn" and probe["platform"] != "gpu":
        sys.exit("--attention cudnn needs a GPU")
    torch_probe = spawn(args, "probe_torch", dtype) if any(n.startswith("trl") for n in names) else None
    cfg = {**probe["model_config"], "num_params": probe["num_params"]}
    results = {}
    for name in names:
        needed = estimate_bytes(name, cfg, args, dtype)
        available = probe["memory_available_bytes"]
        if name.startswith("trl") and torch_probe and torch_probe.get("memory_available_bytes"):
            available = torch_probe["memory_available_bytes"]
        if needed > 0.95 * available and not args.force:
            message = (
                f"does not fit in memory: needs about {needed / GB:.1f} GB to train, "
                f"{available / GB:.1f} GB available (--force runs it anyway)"
            )
            print(f"--- {name}: skipped, {message}", file=sys.stderr, flush=True)
            results[name] = {"status": "skipped", "error": message, "estimated_bytes": needed}
            continue
        results[name] = spawn(args, name, dtype)
        results[name]["estimated_bytes"] = needed
        derive(results[name], probe, args.warmup)
        if results[name]["status"] == "ok":
            r = results[name]
            print(
                f"--- {name}: {r['mean_step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
                f"peak {r['peak_memory_gb']:.2f} GB",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"--- {name}: {results[name]['status']}: {results[name].get('error')}", file=sys.stderr)
    text = report(results, probe, torch_probe, args)
    print(text)
    if args.json:
        out = {
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "dtype": dtype,
            "probe": probe,
            "torch_probe": torch_probe,
            "results": results,
            "report": text,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
