"""The JAX children of `train_throughput.py`: the device probe (platform, dtype, peak matmul
rate, memory, model size), our SFT and DPO steps built as `persllm_jax.train.loop` builds them,
and the minimal hand-written JAX step they are measured against.

JAX, flax, optax and persllm_jax are imported inside the functions, so that importing this module
(as the parent and the TRL children do, through `train_throughput.py`) loads none of them.
"""

from __future__ import annotations

import math
import time

from train_throughput_common import (
    host_memory_available,
    load_result,
    model_config_module,
    peak_rss_bytes,
    random_tokens,
    resolve_dtype,
    time_steps,
)

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


# ---------------------------------------------------------------------------------------------
# What both step children share: the model shape, the timed loop and the result.


def model_config(args):
    """The run's model shape: fp32 parameters, the run's compute dtype, remat and attention."""
    from persllm_jax.model.presets import preset

    return preset(
        args.model,
        param_dtype="float32",
        compute_dtype=args.dtype,
        remat=args.remat,
        attention_impl=args.attention,
    )


def timed_result(args, compiled, run_step, state, base_rss: int, setup_s: float, compile_s: float) -> dict:
    """Run the warm-up and timed steps, then the child's result: times, losses, memory, load."""
    import jax

    _, times, losses, load = time_steps(
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
    """The device, peak memory (CPU: peak RSS; GPU: peak_bytes_in_use) and XLA's allocation."""
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
# Children: our SFT and DPO steps, built as persllm_jax.train.loop builds them.


def child_ours(args, kind: str, lora_rank: int = 0) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from persllm_jax.io import pretrained
    from persllm_jax.model.decoder import CausalLM, abstract_model
    from persllm_jax.model.lora import add_adapters
    from persllm_jax.model.sharding import make_mesh
    from persllm_jax.train.batches import DPOBatch, SFTBatch
    from persllm_jax.train.config import DPOSection, OptimSection
    from persllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from persllm_jax.train.state import init_state, state_shardings
    from persllm_jax.train.step import make_train_step
    from persllm_jax.train.tasks import common
    from persllm_jax.train.tasks.dpo_loss import dpo_batch_loss, pair_logps
    from persllm_jax.train.tasks.sft import sft_loss

    base_rss = peak_rss_bytes()
    cfg = model_config(args)
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
    model = pretrained.assemble(cfg, mesh, random_state)
    trainable = nnx.Param
    if lora_rank:  # the adapters of `persllm sft lora.rank=...` on every projection
        model = add_adapters(model, lora_rank, 2.0 * lora_rank, mesh=mesh)
        cfg, trainable = model.cfg, nnx.LoRAParam
    graphdef, params = nnx.split(model)
    del model
    _, abstract_params = nnx.split(abstract_model(cfg))
    params_shardings = pretrained.state_shardings_for(abstract_params, mesh)
    optim = OptimSection()
    max_steps = 1000
    optimizer = make_optimizer(optim, max_steps)
    schedule = learning_rate_schedule(optim, max_steps)
    train_shardings, _ = state_shardings(optimizer, abstract_params, params_shardings, mesh, trainable)
    sharding = common.batch_sharding(mesh)
    side_shardings = SFTBatch(*([sharding] * 7))

    tokens = random_tokens(args.batch, args.seq + 1, cfg.vocab_size, seed=1)
    ones = np.ones((rows, args.seq), bool)
    no_group = np.full((rows,), -1, np.int32)
    full_length = np.full((rows,), args.seq, np.int32)  # nothing cut
    if kind == "sft":
        host_batch = SFTBatch(tokens[:, :-1], tokens[:, 1:], ones, ones, no_group, no_group, full_length)
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
            chosen=SFTBatch(chosen[:, :-1], chosen[:, 1:], answer, ones, no_group, no_group, full_length),
            rejected=SFTBatch(
                rejected[:, :-1], rejected[:, 1:], answer, ones, no_group, no_group, full_length
            ),
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
        batch = common.to_global(host_batch, sharding, np.arange(rows), rows)
        if kind == "dpo":  # the cached reference log-probs: the starting weights' (DPOTask's pass)
            reference = jax.jit(
                lambda p, c, r: pair_logps(nnx.merge(graphdef, p), c, r, args.logits_chunk)[:2]
            )
            ref_c, ref_r = (
                jax.device_put(x, sharding) for x in reference(params, batch.chosen, batch.rejected)
            )
            batch = batch.replace(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
            del reference
        state = jax.jit(lambda p: init_state(p, optimizer, trainable), out_shardings=train_shardings)(params)
        del params
        step_fn = jax.jit(
            make_train_step(graphdef, loss_fn, optimizer, schedule, 1, trainable=trainable),
            in_shardings=(train_shardings, batch_shardings, None),
            out_shardings=(train_shardings, None),
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

        return timed_result(args, compiled, run_step, state, base_rss, setup_s, compile_s)


# ---------------------------------------------------------------------------------------------
# Child: the minimal hand-written JAX step.


def child_minimal(args) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from persllm_jax.model.decoder import CausalLM, abstract_model
    from persllm_jax.train.config import OptimSection

    base_rss = peak_rss_bytes()
    cfg = model_config(args)
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

    return timed_result(args, compiled, run_step, (params, opt_state), base_rss, setup_s, compile_s)
