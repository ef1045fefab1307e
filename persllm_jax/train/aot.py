"""`persllm compile`: the train step of `persllm sft|dpo` compiled ahead of time for a device
topology, to read the bytes each chip must hold before paying for a slice.

The program is built by the same code as training (`train/program.py`), from the config alone:
the model's shape comes from the preset or from the model path's config (no weights read), the
batch's shapes from `train.batch_size` and `train.seq_len` (no data read). XLA's memory analysis
of the compiled step gives the per-device bytes. Its cost analysis counts a scanned layer body
once, so FLOPs here are counted from the model's shape instead.
"""

from __future__ import annotations

import logging
import math
import os
import re

import jax

from persllm_jax.io import pretrained
from persllm_jax.io.starting_model import load_tokenizer
from persllm_jax.io.vocabulary import register_tokens
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.presets import preset
from persllm_jax.train import distributed
from persllm_jax.train.config import RunConfig
from persllm_jax.train.loop import check_batch_layout, check_training_settings, lora_token_rows, model_options
from persllm_jax.train.program import build_program
from persllm_jax.train.tasks import dpo, sft

log = logging.getLogger(__name__)

GiB = 1024**3
# HBM per chip and peak dense bf16 FLOP/s per chip, as the vendor publishes them, by `device_kind`.
TPU_CHIPS = {
    "TPU v4": (32 * GiB, 275e12),
    "TPU v5 lite": (16 * GiB, 197e12),  # v5e
    "TPU v5": (95 * GiB, 459e12),  # v5p
    "TPU v5p": (95 * GiB, 459e12),
    "TPU v6 lite": (32 * GiB, 918e12),  # v6e (Trillium)
}
REPORT_KEYS = (
    "devices",
    "device_kind",
    "device_memory_bytes",
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "temp_bytes",
    "code_bytes",
    "total_bytes",
    "fits",
    "model_flops_per_step",
)


def topology_devices(name: str, slices: int = 1) -> list:
    """The devices of a topology: a TPU slice as libtpu names it (`v5e:2x2`, `v5p:4x4x4`), or
    `cpu:N` for N fake CPU devices (a quick look on any machine). `slices` > 1 describes that
    many TPU slices of the topology joined by the data-center network (mesh.dcn_*)."""
    if name.startswith("cpu"):
        if slices != 1:
            raise ValueError(f"--slices {slices}: several slices need a TPU topology, not {name}")
        count = int(name.partition(":")[2] or 1)
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ValueError(
                f"--topology {name}: only {len(devices)} CPU devices; start with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (persllm compile sets it)"
            )
        return devices[:count]
    try:
        from jax.experimental import topologies

        # libtpu describes a slice from its name alone when told that this host is its only worker;
        # compiling touches no chip, so other processes compiling at the same time may load it too.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            described = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=slices)
        except Exception as err:
            # A slice smaller than one host's default chips (v5e:1x1, v5e:2x1) is one host holding
            # all of its chips.
            dims = [int(d) for d in name.partition(":")[2].split("x") if d.isdigit()]
            if "chips_per_host_bounds" not in str(err) or not dims:
                raise
            bounds = (dims + [1, 1, 1])[:3]
            described = topologies.get_topology_desc(
                platform="tpu", topology_name=name, num_slices=slices, chips_per_host_bounds=bounds
            )
        return list(described.devices)
    except Exception as err:  # libtpu missing, or a name it does not know
        raise ValueError(
            f"--topology {name}: cannot describe this TPU topology ({type(err).__name__}: {err}); "
            "TPU topologies need libtpu: pip install 'persllm-jax[tpu]'"
        ) from err


def device_memory(device) -> int:
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        return TPU_CHIPS[device.device_kind][0]
    except KeyError:
        raise ValueError(
            f"unknown device kind {device.device_kind!r}; known: {', '.join(TPU_CHIPS)}"
        ) from None


def model_config_for(cfg: RunConfig) -> ModelConfig:
    """The model shape `persllm sft|dpo` would train, without reading weights: the preset or the
    path's config, with the run's dtypes, remat and attention, grown by the added tokens, with the
    run's LoRA adapters."""
    m = cfg.model
    options = model_options(cfg)
    if bool(m.path) == bool(m.preset):
        raise ValueError("set exactly one of model.path and model.preset")
    model_cfg = pretrained.read_model_config(m.path, **options) if m.path else preset(m.preset, **options)
    tokenizer = None
    if m.add_tokens:
        tokenizer = load_tokenizer(m.tokenizer or m.path)
        _, _, vocab = register_tokens(tokenizer, m.add_tokens, model_cfg.vocab_size)
        model_cfg = model_cfg.replace(vocab_size=vocab)
    if cfg.lora.rank:
        lora = cfg.lora
        model_cfg = model_cfg.replace(
            lora_rank=lora.rank,
            lora_alpha=lora.alpha,
            lora_targets=tuple(lora.targets),
            lora_dropout=lora.dropout,
            lora_token_rows=lora_token_rows(cfg, tokenizer) if tokenizer is not None else (),
            base_quantization=lora.base_quantization,
        )
    return model_cfg


def model_flops_per_step(task: str, cfg: RunConfig, model_cfg: ModelConfig) -> float:
    """Useful FLOPs of one optimizer step (remat's recomputation not counted, as in MFU).

    Per token, a forward pass costs 2 FLOPs per weight of every matmul (the output projection
    included) plus causal attention's 2 x 2 x seq_len / 2 x heads x head_dim per layer; training
    costs three forwards. DPO trains on chosen and rejected sequences, and a frozen reference adds
    one forward of both."""
    c = model_cfg
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    matmul_weights = c.num_layers * per_layer + c.hidden_size * c.vocab_size
    attention = c.num_layers * 2 * cfg.train.seq_len * q  # 2 matmuls x 2 FLOPs x seq_len / 2 (causal)
    forward_per_token = 2 * matmul_weights + attention
    sequences = cfg.train.batch_size * (2 if task == "dpo" else 1)
    tokens = sequences * cfg.train.seq_len
    flops = 3 * forward_per_token * tokens
    if task == "dpo" and cfg.dpo.reference == "frozen":
        flops += forward_per_token * tokens
    return float(flops)


def compile_step(task: str, cfg: RunConfig, devices: list) -> dict:
    """AOT-compile the train step of `task` ("sft" or "dpo") for `devices`; the memory report."""
    if task not in ("sft", "dpo"):
        raise ValueError(f"compile sft or dpo, not {task!r}")
    check_training_settings(cfg)
    mesh = distributed.build_mesh(cfg.mesh, devices)
    check_batch_layout(cfg, mesh)
    model_cfg = model_config_for(cfg)
    program = build_program(cfg, model_cfg, mesh)
    # Per-persona / per-stage metric slices have one entry each here; with real data they have a
    # few, which changes the step's memory by a few bytes.
    if task == "sft":
        shardings = sft.batch_shardings(mesh)
        batch, loss_fn = sft.abstract_batch(cfg, shardings), sft.make_loss_fn(cfg, 1, 1)
        frozen, frozen_shardings = None, None
    else:
        dpo.check_settings(cfg)
        shardings = dpo.batch_shardings(mesh, packed=cfg.train.packing)
        batch, loss_fn = dpo.abstract_batch(cfg, shardings), dpo.make_loss_fn(cfg, program.graphdef, 1, 1)
        frozen_shardings = program.params_shardings if cfg.dpo.reference == "frozen" else None
        frozen = program.abstract_params if frozen_shardings is not None else None
    args = (program.abstract_state(), batch, frozen)
    with jax.set_mesh(mesh):
        step = program.jit_step(loss_fn, shardings, frozen_shardings)
        try:
            memory = _memory_figures(step.lower(*args).compile().memory_analysis())
        except jax.errors.JaxRuntimeError as err:
            # The TPU compiler refuses a step whose temporaries exceed the chip's memory.
            memory = _refused_figures(err, args)
    report = {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "device_memory_bytes": device_memory(devices[0]),
        **memory,
    }
    # What one device holds at once: its inputs, its outputs less those written over donated
    # inputs, the step's temporaries, and the program.
    report["total_bytes"] = (
        report["argument_bytes"]
        + report["output_bytes"]
        - report["alias_bytes"]
        + report["temp_bytes"]
        + report["code_bytes"]
    )
    report["fits"] = report["total_bytes"] <= report["device_memory_bytes"]
    report["model_flops_per_step"] = model_flops_per_step(task, cfg, model_cfg)
    report["mesh"] = dict(mesh.shape)
    report["parameters"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(program.abstract_params)))
    return report


def _memory_figures(memory) -> dict:
    return {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "code_bytes": int(memory.generated_code_size_in_bytes),
    }


_REFUSED = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _refused_figures(err: Exception, args) -> dict:
    """Figures for a step the compiler would not build: the temporaries it asked for (from its
    message) and the arguments' shard sizes (the train state is donated: outputs alias it)."""
    found = _REFUSED.search(str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or found is None:
        raise err
    temp = int(float(found.group(1)) * _UNITS[found.group(2)])

    def shard_bytes(tree) -> int:
        leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "sharding")]
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)

    state = shard_bytes(args[0])
    log.warning("the compiler refused the step: %s", str(err).splitlines()[0])
    return {
        "argument_bytes": state + shard_bytes(args[1:]),
        "output_bytes": state,
        "alias_bytes": state,
        "temp_bytes": temp,
        "code_bytes": 0,
        "refused": str(err).splitlines()[0],
    }


def step_time_at_mfu(report: dict, mfu: float = 0.5) -> float | None:
    """Seconds per step if the slice ran at `mfu` of its chips' published peak (a projection)."""
    chip = TPU_CHIPS.get(report["device_kind"])
    if chip is None:
        return None
    return report["model_flops_per_step"] / (report["devices"] * chip[1] * mfu)


def format_report(task: str, topology: str, report: dict) -> str:
    gib = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"{task} step on {topology}: {report['devices']} x {report['device_kind']}, mesh "
        + " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
        + f", {report['parameters'] / 1e9:.2f}B parameters",
        "per device:",
        f"  arguments {gib(report['argument_bytes'])}",
        f"  outputs   {gib(report['output_bytes'])}  (aliasing donated inputs: {gib(report['alias_bytes']).strip()})",
        f"  temp      {gib(report['temp_bytes'])}",
        f"  code      {gib(report['code_bytes'])}",
        f"  total     {gib(report['total_bytes'])}  of {gib(report['device_memory_bytes']).strip()}",
        f"model FLOPs per step: {report['model_flops_per_step']:.3e}",
    ]
    seconds = step_time_at_mfu(report)
    if seconds is not None:
        lines.append(f"projected step time at 50% MFU: {seconds:.3f} s (a projection, not a measurement)")
    if report.get("refused"):
        lines.append(f"the compiler refused the step: {report['refused']}")
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(
        f"verdict: {verdict} ({100 * report['total_bytes'] / report['device_memory_bytes']:.0f}% of device memory)"
    )
    return "\n".join(lines)
