"""Training throughput: our SFT and DPO steps against a minimal JAX step and TRL, on one model shape.

Five measurements, each in its own child process (so that peak memory is per measurement):

  ours_sft     our real train step (`make_train_step` + `sft_loss`, chunked loss, scanned layers),
               jitted exactly as `persllm_jax.trainer` jits it (in/out shardings, state donated),
               on random weights and a random token batch with every target trained
  ours_dpo     our DPO step with cached reference log-probs (`dpo_batch_loss`, reference=None),
               batch/2 pairs, so the number of sequences equals SFT's
  minimal_jax  the framework-free ceiling: our CausalLM forward, plain cross-entropy on
               materialized logits, optax.adamw, donated buffers, same remat setting
  trl_sft      TRL's SFTTrainer on the same shape (LlamaForCausalLM, random init), full rows
  trl_dpo      TRL's DPOTrainer, batch/2 pairs, precompute_ref_log_probs=True (precompute excluded)

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
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "data" / "tokenizer"
MEASUREMENTS = ("ours_sft", "ours_dpo", "minimal_jax", "trl_sft", "trl_dpo")
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
        f"--child={name}",
    ]
    if args.trl_gradient_checkpointing:
        argv.append("--trl-gradient-checkpointing")
    return argv


# ---------------------------------------------------------------------------------------------
# Helpers shared by the children.


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def model_config_module():
    """persllm_jax/model_config.py loaded on its own: the TRL children need the presets and
    `to_hf_config` without importing the package (and with it JAX) into the torch process."""
    spec = importlib.util.spec_from_file_location(
        "_persllm_model_config", ROOT / "persllm_jax" / "model_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def resolve_dtype(dtype: str, platform: str, model: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if platform == "gpu" and model in ("llama3_1b", "llama3_8b") else "float32"


def host_memory_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def random_tokens(batch: int, length: int, vocab: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


class OtherLoad:
    """The share of the host's CPU time that other processes used between start() and stop()
    (Linux; None elsewhere): timings on a busy machine are not comparable. `own_cpu_s` is this
    process's CPU time (all threads) over the same span, which a busy host disturbs less."""

    def __init__(self):
        self.begin = None
        self.other = self.own_cpu_s = None

    @staticmethod
    def _sample():
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy = sum(ticks) - ticks[3] - ticks[4]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12]), time.perf_counter()  # utime + stime of all threads

    def start(self):
        try:
            self.begin = self._sample()
        except (OSError, IndexError, ValueError):
            self.begin = None

    def stop(self):
        if self.begin is None:
            return None
        busy, own, now = self._sample()
        tick = os.sysconf("SC_CLK_TCK")
        self.own_cpu_s = (own - self.begin[1]) / tick
        capacity = (now - self.begin[2]) * tick * (os.cpu_count() or 1)
        self.other = max(0.0, (busy - self.begin[0]) - (own - self.begin[1])) / max(capacity, 1e-9)
        return self.other


def load_result(load: OtherLoad, steps: int, per_step: list) -> dict:
    cpu = None if load.own_cpu_s is None else load.own_cpu_s / steps
    return {"other_cpu_load": load.other, "cpu_s_per_step": cpu, "step_other_load": per_step}


def time_steps(run_step, state, warmup: int, steps: int, block):
    """Run warmup + steps steps; returns (state, per-step seconds, losses, (the timed steps'
    OtherLoad, each step's share of the CPU used by other processes))."""
    times, losses, load, per_step = [], [], OtherLoad(), []
    for i in range(warmup + steps):
        if i == warmup:
            load.start()
        step_load = OtherLoad()
        step_load.start()
        start = time.perf_counter()
        state, loss = run_step(state)
        block(state, loss)
        times.append(time.perf_counter() - start)
        per_step.append(step_load.stop())
        losses.append(float(loss))
    load.stop()
    return state, times, losses, (load, per_step)


# ---------------------------------------------------------------------------------------------
# Child: the device, its peak matmul rate, the model's size.


def child_probe(args) -> dict:
    import jax
    import jax.numpy as jnp

    mc = model_config_module()
    devices = jax.local_devices()
    platform = devices[0].platform
    dtype = resolve_dtype(args.dtype, platform, args.model)
    cfg = mc.preset(args.model)
    n = 8192 if platform == "gpu" else 2048
    repeats = 10 if platform == "gpu" else 1  # matmuls per timed call: amortize the dispatch on GPU
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

    @jax.jit
    def chain(x, y):
        for _ in range(repeats):
            x = x @ y
        return x

    chain(a, b).block_until_ready()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    if platform == "cpu":
        memory = host_memory_available()
    else:
        memory = min(d.memory_stats().get("bytes_limit", 0) for d in devices)
    return {
        "platform": platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "dtype": dtype,
        "jax_version": jax.__version__,
        "peak_flops": 2.0 * n**3 * repeats / best,
        "peak_matmul": f"{n}^3 {dtype} x{repeats}",
        "memory_available_bytes": memory,
        "num_params": cfg.num_params,
        "flops_per_token": cfg.flops_per_token(args.seq),
        "model_config": cfg.to_dict(),
    }


def child_probe_torch(args) -> dict:
    """Torch's own peak matmul rate in the run's dtype (for reading TRL's numbers; MFU uses JAX's)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = 8192 if cuda else 2048
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = (torch.randn(n, n, generator=gen) / math.sqrt(n)).to(device, dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = math.inf
    for i in range(6):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if i:
            best = min(best, time.perf_counter() - start)
    return {
        "torch_version": torch.__version__,
        "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_peak_flops": 2.0 * n**3 / best,
        "memory_available_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
    }


# ---------------------------------------------------------------------------------------------
# Children: our SFT and DPO steps, built as persllm_jax.trainer builds them.


def child_ours(args, kind: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from persllm_jax import loading, task_common
    from persllm_jax.batches import DPOBatch, SFTBatch
    from persllm_jax.dpo import dpo_batch_loss, pair_logps
    from persllm_jax.model import CausalLM, abstract_model
    from persllm_jax.model_config import preset
    from persllm_jax.optim import learning_rate_schedule, make_optimizer
    from persllm_jax.run_config import DPOSection, OptimSection
    from persllm_jax.sft import sft_loss
    from persllm_jax.sharding import make_mesh
    from persllm_jax.train_step import init_state, make_train_step
    from persllm_jax.trainer import _state_shardings

    base_rss = peak_rss_bytes()
    cfg = preset(
        args.model,
        param_dtype="float32",
        compute_dtype=args.dtype,
        remat=args.remat,
        attention_impl=args.attention,
    )
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = args.batch if kind == "sft" else args.batch // 2
    if rows % data_parallel:
        raise ValueError(f"{rows} rows per step do not divide over {data_parallel} devices")

    # Random weights, materialized straight into their shards (trainer.load_initial_model).
    def random_state(abstract, shardings):
        make = lambda: nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))[1]  # noqa: E731
        return jax.jit(make, out_shardings=shardings)()

    start = time.perf_counter()
    model = loading.assemble(cfg, mesh, random_state)
    graphdef, params = nnx.split(model)
    del model
    _, abstract_params = nnx.split(abstract_model(cfg))
    params_shardings = loading.state_shardings_for(abstract_params, mesh)
    optim = OptimSection()
    max_steps = 1000
    optimizer = make_optimizer(optim, max_steps)
    schedule = learning_rate_schedule(optim, max_steps)
    state_shardings, _ = _state_shardings(optimizer, abstract_params, params_shardings, mesh)
    sharding = task_common.batch_sharding(mesh)
    side_shardings = SFTBatch(*([sharding] * 6))

    tokens = random_tokens(args.batch, args.seq + 1, cfg.vocab_size, seed=1)
    ones = np.ones((rows, args.seq), bool)
    no_group = np.full((rows,), -1, np.int32)
    if kind == "sft":
        host_batch = SFTBatch(tokens[:, :-1], tokens[:, 1:], ones, ones, no_group, no_group)
        batch_shardings = side_shardings

        def loss_fn(model, batch, frozen):
            return sft_loss(model, batch, chunk_size=args.logits_chunk)

    else:
        # Pairs share a prompt (the first quarter); only the answer's targets are trained.
        prompt = max(1, args.seq // 4)
        chosen, rejected = tokens[:rows], tokens[rows:].copy()
        rejected[:, :prompt] = chosen[:, :prompt]
        answer = np.broadcast_to(np.arange(args.seq) >= prompt - 1, (rows, args.seq))
        ref = np.zeros((rows,), np.float32)  # replaced below by the reference pass
        host_batch = DPOBatch(
            chosen=SFTBatch(chosen[:, :-1], chosen[:, 1:], answer, ones, no_group, no_group),
            rejected=SFTBatch(rejected[:, :-1], rejected[:, 1:], answer, ones, no_group, no_group),
            ref_chosen_logps=ref,
            ref_rejected_logps=ref,
        )
        batch_shardings = DPOBatch(
            chosen=side_shardings,
            rejected=side_shardings,
            ref_chosen_logps=sharding,
            ref_rejected_logps=sharding,
        )
        dpo = DPOSection()

        def loss_fn(model, batch, frozen):
            return dpo_batch_loss(model, batch, None, dpo=dpo, chunk_size=args.logits_chunk)

    with jax.set_mesh(mesh):
        batch = task_common.to_global(host_batch, sharding)
        if kind == "dpo":  # the cached reference log-probs: the starting weights' (DPOTask's pass)
            reference = jax.jit(
                lambda p, c, r: pair_logps(nnx.merge(graphdef, p), c, r, args.logits_chunk)[:2]
            )
            ref_c, ref_r = (
                jax.device_put(x, sharding) for x in reference(params, batch.chosen, batch.rejected)
            )
            batch = batch.replace(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
            del reference
        state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_shardings)(params)
        del params
        step_fn = jax.jit(
            make_train_step(graphdef, loss_fn, optimizer, schedule, 1),
            in_shardings=(state_shardings, batch_shardings, None),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
        jax.block_until_ready(state)
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch, None).compile()
        compile_s = time.perf_counter() - start

        def run_step(state):
            state, metrics = compiled(state, batch, None)
            return state, metrics["loss"]

        state, times, losses, load = time_steps(
            run_step, state, args.warmup, args.steps, lambda s, loss: jax.block_until_ready((s, loss))
        )
    return {
        **jax_result(compiled, base_rss),
        "step_times_s": times,
        "losses": losses,
        "tokens_per_step": args.batch * args.seq,
        "setup_s": setup_s,
        "compile_s": compile_s,
        **load_result(load[0], args.steps, load[1]),
    }


def jax_result(compiled, base_rss: int) -> dict:
    import jax

    devices = jax.local_devices()
    out = {"device": f"{devices[0].device_kind} x{len(devices)}", "base_memory_bytes": base_rss}
    if devices[0].platform == "cpu":
        out["peak_memory_bytes"] = peak_rss_bytes()
        out["memory_kind"] = "peak RSS"
    else:
        out["peak_memory_bytes"] = max(d.memory_stats()["peak_bytes_in_use"] for d in devices)
        out["memory_kind"] = "peak_bytes_in_use"
        out["base_memory_bytes"] = None
    try:
        stats = compiled.memory_analysis()
        out["xla_memory"] = {
            k: getattr(stats, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")
        }
    except Exception:  # not every backend reports it
        pass
    return out


# ---------------------------------------------------------------------------------------------
# Child: the minimal hand-written JAX step.


def child_minimal(args) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from persllm_jax.model import CausalLM, abstract_model
    from persllm_jax.model_config import preset
    from persllm_jax.run_config import OptimSection

    base_rss = peak_rss_bytes()
    cfg = preset(
        args.model,
        param_dtype="float32",
        compute_dtype=args.dtype,
        remat=args.remat,
        attention_impl=args.attention,
    )
    devices = jax.local_devices()
    if args.batch % len(devices):
        raise ValueError(f"batch {args.batch} does not divide over {len(devices)} devices")
    mesh = Mesh(np.asarray(devices), ("batch",))  # data parallel; a plain jit, no mesh context
    replicated, by_row = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))

    start = time.perf_counter()
    graphdef = nnx.split(abstract_model(cfg))[0]
    params = jax.jit(lambda: nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=replicated)()
    o = OptimSection()
    tx = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    tokens = random_tokens(args.batch, args.seq + 1, cfg.vocab_size, seed=1)
    inputs = jax.device_put(tokens[:, :-1], by_row)
    targets = jax.device_put(tokens[:, 1:], by_row)

    def loss_fn(params, inputs, targets):
        logits = nnx.merge(graphdef, params)(inputs)  # [B, T, V] float32, materialized
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jax.block_until_ready((params, opt_state))
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, inputs, targets).compile()
    compile_s = time.perf_counter() - start

    def run_step(state):
        params, opt_state, loss = compiled(*state, inputs, targets)
        return (params, opt_state), loss

    _, times, losses, load = time_steps(
        run_step,
        (params, opt_state),
        args.warmup,
        args.steps,
        lambda s, loss: jax.block_until_ready((s, loss)),
    )
    return {
        **jax_result(compiled, base_rss),
        "step_times_s": times,
        "losses": losses,
        "tokens_per_step": args.batch * args.seq,
        "setup_s": setup_s,
        "compile_s": compile_s,
        **load_result(load[0], args.steps, load[1]),
    }


# ---------------------------------------------------------------------------------------------
# Children: TRL's SFTTrainer and DPOTrainer.


class _Words:
    """Random text from the tokenizer's own whole-word tokens, checked to reach a token count."""

    def __init__(self, tokenizer, seed: int):
        import numpy as np

        vocab = tokenizer.get_vocab()
        self.words = sorted(
            t[1:]
            for t in vocab
            if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and len(t) > 3
        )
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)

    def text(self, min_tokens: int) -> str:
        """At least min_tokens tokens (each word is one token after a space; a few more overall)."""
        n = min_tokens
        while True:
            text = " ".join(self.words[i] for i in self.rng.integers(0, len(self.words), n))
            count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if count >= min_tokens:
                return text
            n += min_tokens - count


def child_trl(args, kind: str) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    base_rss = peak_rss_bytes()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mc = model_config_module()
    hf_config = mc.to_hf_config(mc.preset(args.model))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).float()
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; the model {hf_config.vocab_size}")
    words = _Words(tokenizer, seed=0)
    num_steps = args.warmup + args.steps
    rows = args.batch if kind == "sft" else args.batch // 2

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.load, self.step_load, self.per_step = [], OtherLoad(), OtherLoad(), []

        def on_step_begin(self, args_, state, control, **kwargs):
            sync()
            if len(self.times) == args.warmup:
                self.load.start()
            self.step_load = OtherLoad()
            self.step_load.start()
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)
            self.per_step.append(self.step_load.stop())
            if len(self.times) == args.warmup + args.steps:
                self.load.stop()

    timer = StepTimer()
    common = dict(
        max_steps=num_steps,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        max_length=args.seq,
        learning_rate=5e-5,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-5,
        max_grad_norm=1.0,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        use_cpu=not cuda,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        if kind == "sft":
            data = datasets.Dataset.from_dict(
                {"text": [words.text(args.seq + 1) for _ in range(rows * num_steps)]}
            )
            config = trl.SFTConfig(output_dir=out_dir, packing=False, dataset_text_field="text", **common)
            trainer = trl.SFTTrainer(
                model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer]
            )
            lengths = [min(len(ids), args.seq) for ids in trainer.train_dataset["input_ids"]]
        else:
            prompt_tokens = max(1, args.seq // 4)
            data = datasets.Dataset.from_list(
                [
                    {
                        "prompt": words.text(prompt_tokens),
                        "chosen": " " + words.text(args.seq),
                        "rejected": " " + words.text(args.seq),
                    }
                    for _ in range(rows * num_steps)
                ]
            )
            config = trl.DPOConfig(
                output_dir=out_dir,
                precompute_ref_log_probs=True,
                precompute_ref_batch_size=rows,
                beta=0.1,
                loss_type=["sigmoid"],
                **common,
            )
            trainer = trl.DPOTrainer(
                model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer]
            )
            lengths = [
                min(len(row["prompt_ids"]) + len(row[side]), args.seq)
                for row in trainer.train_dataset
                for side in ("chosen_ids", "rejected_ids")
            ]
        setup_s = time.perf_counter() - start  # tokenization, and for DPO the reference precompute
        if min(lengths) != args.seq:
            raise RuntimeError(f"some rows are shorter than {args.seq} tokens: {min(lengths)}")
        setup_peak = torch.cuda.max_memory_allocated() if cuda else 0  # the DPO precompute's peak
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "step_times_s": timer.times,
        "losses": losses,
        "tokens_per_step": args.batch * args.seq,
        "setup_s": setup_s,
        "optimizer": str(config.optim),
        "attention": model.config._attn_implementation,
        "gradient_checkpointing": args.trl_gradient_checkpointing,
        **load_result(timer.load, args.steps, timer.per_step),
    }
    if cuda:
        out["peak_memory_bytes"] = max(torch.cuda.max_memory_allocated(), setup_peak)
        out["memory_kind"] = "torch.cuda.max_memory_allocated"
        out["base_memory_bytes"] = None
    else:
        out["peak_memory_bytes"] = peak_rss_bytes()
        out["memory_kind"] = "peak RSS"
        out["base_memory_bytes"] = base_rss
    return out


def run_child(args) -> dict:
    if args.child == "probe":
        return child_probe(args)
    if args.child == "probe_torch":
        return child_probe_torch(args)
    if args.child in ("ours_sft", "ours_dpo"):
        return child_ours(args, args.child.split("_")[1])
    if args.child == "minimal_jax":
        return child_minimal(args)
    if args.child in ("trl_sft", "trl_dpo"):
        return child_trl(args, args.child.split("_")[1])
    raise ValueError(f"unknown child {args.child!r}")


# ---------------------------------------------------------------------------------------------
# Parent: run the children, estimate memory, report.


def wait_idle(limit_s: float) -> None:
    """Wait (at most limit_s) until other processes use under 10% of the CPU over 2 s."""
    start = time.perf_counter()
    said = -math.inf
    while time.perf_counter() < start + limit_s:
        load = OtherLoad()
        load.start()
        time.sleep(2.0)
        busy = load.stop()
        if busy is None or busy < 0.10:
            return
        if time.perf_counter() - said > 60:
            said = time.perf_counter()
            print(f"    host busy ({busy:.0%} CPU used by others); waiting", file=sys.stderr, flush=True)
    print(f"    host still busy after {limit_s:.0f} s; measuring anyway", file=sys.stderr, flush=True)


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
    for ours, trl in (("ours_sft", "trl_sft"), ("ours_dpo", "trl_dpo")):
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
