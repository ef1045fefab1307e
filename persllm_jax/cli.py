"""The `persllm` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from persllm_jax.inference.sampling import PERSONA_SAMPLING
from persllm_jax.personas.probes import INDEPENDENT_PROBES_FILE, PROBES_FILE


def _import_hf(args) -> None:
    from persllm_jax.io import pretrained, vocabulary

    model, tokenizer = pretrained.load_pretrained(args.src, dtype=args.dtype)
    if args.add_tokens:
        if tokenizer is None:
            raise SystemExit(f"--add-tokens needs a tokenizer, and {args.src} has none")
        model = vocabulary.add_special_tokens(model, tokenizer, args.add_tokens.split(","))
    out = pretrained.save_model_dir(model, tokenizer, args.out)
    print(
        f"wrote {out} ({pretrained.count_params(model) / 1e6:.1f}M parameters, vocabulary {model.cfg.vocab_size})"
    )


def _export_hf(args) -> None:
    from persllm_jax.io import pretrained

    model, tokenizer = pretrained.load_pretrained(args.checkpoint, dtype=args.dtype)
    if args.adapter:
        from persllm_jax.io.peft_adapter import added_token_ids, base_model_of, save_adapter

        base = base_model_of(Path(args.checkpoint))
        added = added_token_ids(Path(args.checkpoint), tokenizer)
        out = save_adapter(model, args.out, base_model=base, tokenizer=tokenizer, added_token_ids=added)
        resize = (
            f"base_model.resize_token_embeddings({len(tokenizer)}) (the added tokens' rows are in the "
            "adapter), then "
            if added
            else ""
        )
        print(
            f"wrote {out}: load it with {resize}peft.PeftModel.from_pretrained(base_model, {str(out)!r}) "
            f"(base: {base})"
        )
        return
    out = pretrained.save_pretrained(model, tokenizer, args.out, dtype=args.dtype)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _train(task: str):
    def run(args) -> None:
        from persllm_jax import configlib
        from persllm_jax.train import loop
        from persllm_jax.train.config import RunConfig

        cfg = configlib.load(RunConfig, args.config, args.overrides)
        if task == "sft":
            from persllm_jax.train.tasks.sft import SFTTask as make_task
        else:
            import functools

            from persllm_jax.builder.on_policy import sample_pairs
            from persllm_jax.train.tasks.dpo import DPOTask

            make_task = functools.partial(DPOTask, sample_pairs=sample_pairs)
        loop.train(cfg, make_task)
        print(
            f"{task} finished: {cfg.run_dir} (metrics.jsonl, loss.png, checkpoints/)"
        )  # as the user gave it

    return run


def _build_data(args) -> None:
    from persllm_jax import configlib
    from persllm_jax.builder.build import build
    from persllm_jax.builder.config import BuildConfig

    cfg = configlib.load(BuildConfig, args.config, args.overrides)
    stats = build(cfg)
    print(
        f"build-data finished: {cfg.out_dir}: {stats['dialogues']} dialogues, {stats['pairs']} pairs, "
        f"{stats['dropped']} seeds dropped, {stats['llm'].get('requests_sent', 0)} requests, "
        f"{stats['llm'].get('cache_hits', 0)} cache hits"
    )


def _chat(args) -> None:
    from persllm_jax.inference.chat import run_chat

    run_chat(
        args.model,
        persona=args.persona,
        stage=args.stage,
        personas_dir=args.personas_dir,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        dtype=args.dtype,
    )


def _serve(args) -> None:
    import os

    from persllm_jax.inference import serving

    serving.serve(
        args.model,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        max_batch=args.max_batch,
        dtype=args.dtype,
        batch_window_s=args.batch_window_ms / 1000,
        default_max_tokens=args.default_max_tokens,
        warmup=not args.no_warmup,
        max_queue=args.max_queue,
        api_key=args.api_key or os.environ.get("PERSLLM_API_KEY") or None,
        docs=args.docs,
        kv_cache_gib=args.kv_cache_gib,
        prefix_cache=not args.no_prefix_cache,
        ui=args.ui,
        personas_dir=args.personas_dir,
    )


def _eval(args) -> None:
    from persllm_jax import configlib
    from persllm_jax.evaluation.config import EvalConfig
    from persllm_jax.evaluation.runner import evaluate

    if args.config:
        cfg = configlib.load(EvalConfig, args.config, args.overrides)
    else:
        if not (args.checkpoint and args.data):
            raise ValueError("give --config, or --checkpoint DIR and --data FILE")
        models = [
            {"name": c.split("=", 1)[0], "path": c.split("=", 1)[1]}
            if "=" in c
            else {"name": Path(c).name, "path": c}
            for c in args.checkpoint
        ]
        data = {
            "out_dir": args.out,
            "models": models,
            "data": {"dialogues": args.data, "pairs": args.pairs or ""},
            "judge": {"enabled": False},
        }
        cfg = configlib.from_dict(EvalConfig, configlib.apply_overrides(data, args.overrides))
    result = evaluate(cfg)
    print(f"eval finished: {result['report']['md']} (report.json, PNG plots beside it)")


def _probe(args) -> None:
    from persllm_jax.evaluation.probes.run import accuracy_line, probe_models, write_outputs

    models = [
        tuple(m.split("=", 1)) if "=" in m and not Path(m).exists() else (Path(m).name or m, m)
        for m in args.model
    ]
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}: name them as NAME=PATH")
    if args.probes and args.probe_set:
        raise ValueError("give --probes (files) or --probe-set (the set each persona folder ships), not both")
    result = probe_models(
        models,
        args.probes or (),
        personas_dir=args.personas_dir,
        probe_set=args.probe_set or PROBES_FILE,
        dialogues=args.dialogues,
        split=args.split,
        dtype=args.dtype,
        seed=args.seed,
    )
    write_outputs(result, args.json, args.markdown)
    for name, r in result["models"].items():
        print(accuracy_line(name, r))
    written = [p for p in (args.json, args.markdown) if p]
    print(
        f"probe finished: {result['meta']['probes']} probes"
        + (f"; wrote {', '.join(written)}" if written else "")
    )


def _talk(args) -> None:
    from persllm_jax import configlib
    from persllm_jax.inference.talk import TalkConfig, talk

    written = talk(configlib.load(TalkConfig, args.config, args.overrides))
    print(f"talk finished: {written['md']} and {written['jsonl']}")


def _pipeline(args) -> None:
    from persllm_jax.pipeline import run_pipeline

    run_pipeline(args.config, args.overrides)


def _compile(args) -> int:
    import json
    import os

    if args.topology.startswith("cpu"):  # before JAX starts its CPU backend
        count = args.topology.partition(":")[2] or "1"
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    from persllm_jax import configlib
    from persllm_jax.train import aot
    from persllm_jax.train.config import RunConfig

    cfg = configlib.load(RunConfig, args.config, args.overrides)
    devices = aot.topology_devices(args.topology, args.slices)
    report = aot.compile_step(args.task, cfg, devices)
    where = args.topology if args.slices == 1 else f"{args.slices} x {args.topology}"
    print(aot.format_report(args.task, where, report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({k: report[k] for k in aot.REPORT_KEYS}, indent=2) + "\n")
    return 0 if report["fits"] else 1


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help followed by its default, where it has one to say and does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def _command(commands, name: str, text: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=text, description=text, formatter_class=_HelpWithDefaults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persllm", description=__doc__, formatter_class=_HelpWithDefaults)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, HTTP request lines of the LLM clients included",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = _command(commands, "build-data", "persona materials -> persona dialogues and preference pairs")
    p.add_argument("--config", required=True, help="YAML build config (configs/data_*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. limits.seeds_per_stage=2")
    p.set_defaults(func=_build_data)

    for task, text in (("sft", "personified conversational SFT"), ("dpo", "DPO on preference pairs")):
        p = _command(commands, task, text)
        p.add_argument("--config", required=True, help=f"YAML run config (configs/{task}_*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=8")
        p.set_defaults(func=_train(task))

    p = _command(commands, "import-hf", "HF directory or .gguf file -> persllm model directory")
    p.add_argument("src", help="HF model directory or .gguf file")
    p.add_argument("out", help="output persllm model directory")
    p.add_argument(
        "--add-tokens", default="", help='comma-separated special tokens, e.g. "<TIME-I>,<TIME-II>"'
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.set_defaults(func=_import_hf)

    p = _command(commands, "export-hf", "persllm model directory or run checkpoint -> HF directory")
    p.add_argument("checkpoint", help="persllm model directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="output HF directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="exported dtype")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write its adapters as a PEFT adapter directory instead of merged weights",
    )
    p.set_defaults(func=_export_hf)

    model_help = "HF directory, .gguf file, persllm model directory or training run directory"
    p = _command(commands, "chat", "chat with a model in the terminal, optionally as a persona")
    p.add_argument("model", help=model_help)
    p.add_argument("--persona", help="persona id (a folder of --personas-dir); no system prompt without it")
    p.add_argument("--stage", help="stage id of the persona (default: its last stage)")
    p.add_argument("--personas-dir", default=None, help="persona folders (default: examples/personas)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit in tokens")
    p.add_argument("--temperature", type=float, default=PERSONA_SAMPLING.temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=PERSONA_SAMPLING.top_p, help="1 disables top-p")
    p.add_argument("--top-k", type=int, default=PERSONA_SAMPLING.top_k, help="0 disables top-k")
    p.add_argument(
        "--repetition-penalty", type=float, default=PERSONA_SAMPLING.repetition_penalty, help="1 disables it"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first reply (+1 per reply)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.set_defaults(func=_chat)

    p = _command(commands, "serve", "OpenAI-compatible chat server (/v1/chat/completions)")
    p.add_argument("model", help=model_help)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $PERSLLM_API_KEY; "
        "none: no check, with a warning when --host is not loopback)",
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait; more get 429 with Retry-After"
    )
    p.add_argument("--docs", action="store_true", help="serve the interactive /docs pages (off by default)")
    p.add_argument(
        "--ui",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the chat page at / (default: on when --host is loopback)",
    )
    p.add_argument(
        "--personas-dir",
        default=None,
        help="personas the chat page offers (default: ./examples/personas, as persllm chat)",
    )
    p.add_argument("--model-name", default=None, help="model id clients use (default: the path's basename)")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: most requests generated together")
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="the KV cache's memory budget in GiB (default: 1024 tokens per slot, at least 4096)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not reuse the keys and values of prompt prefixes seen before",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=15.0,
        help="how long an idle server waits for more requests before it starts, in milliseconds",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=512,
        help="reply limit for requests without max_tokens (capped by the context left)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before listening")
    p.set_defaults(func=_serve)
    p = _command(commands, "eval", "evaluate models on the held-out split: BLEU, DPO, judge; report")
    p.add_argument("--config", help="YAML eval config (configs/eval_*.yaml)")
    p.add_argument(
        "--checkpoint", action="append", help="NAME=PATH or PATH of a model (repeatable), without --config"
    )
    p.add_argument("--data", help="dialogues.jsonl (its test split), without --config")
    p.add_argument("--pairs", help="pairs.jsonl (its test split) for DPO metrics, without --config")
    p.add_argument("--out", default="runs/eval", help="report directory, without --config")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. generation.max_new_tokens=64"
    )
    p.set_defaults(func=_eval)

    p = _command(
        commands, "probe", "judge-free persona probes: multiple-choice accuracy, twin accuracy, stage effect"
    )
    p.add_argument("model", nargs="+", help=f"NAME=PATH or PATH; PATH: {model_help}")
    p.add_argument(
        "--probes",
        action="extend",
        nargs="+",
        help="probe files (JSONL; default: the --probe-set file of every persona in --personas-dir)",
    )
    p.add_argument(
        "--probe-set",
        choices=[PROBES_FILE, INDEPENDENT_PROBES_FILE],
        help=f"which set each persona folder ships (default {PROBES_FILE}; {INDEPENDENT_PROBES_FILE}: "
        "written from the materials alone, apart from the first set and the reference dialogues)",
    )
    p.add_argument("--personas-dir", default="examples/personas", help="persona folders the probes name")
    p.add_argument(
        "--dialogues",
        default=None,
        help="dialogues.jsonl: persona attribution on its held-out split (optional)",
    )
    p.add_argument("--split", default="test", help="the split of --dialogues")
    p.add_argument("--json", default=None, help="write every metric and each probe's scores here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.set_defaults(func=_probe)

    p = _command(commands, "talk", "two personified agents converse on a topic")
    p.add_argument("--config", required=True, help="YAML talk config (configs/talk_*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. turns=4")
    p.set_defaults(func=_talk)

    p = _command(
        commands,
        "compile",
        "AOT-compile the sft or dpo train step for a TPU slice: bytes per chip, exit 1 if it does not fit",
    )
    tasks = p.add_subparsers(dest="task", required=True)
    for task in ("sft", "dpo"):
        t = _command(tasks, task, f"the step `persllm {task}` would run with this config")
        t.add_argument(
            "--topology",
            required=True,
            help="TPU topology as libtpu names it (v5e:2x2, v5p:4x4x4, v6e:16x16), or cpu:N fake CPU devices",
        )
        t.add_argument(
            "--slices",
            type=int,
            default=1,
            help="number of such TPU slices joined by the data-center network (default 1); set "
            "mesh.dcn_data or mesh.dcn_fsdp to spread the mesh over them",
        )
        t.add_argument("--config", required=True, help=f"the YAML run config `persllm {task}` would take")
        t.add_argument("--json", default=None, help="also write the figures to this JSON file")
        t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=64")
        t.set_defaults(func=_compile)

    p = _command(commands, "pipeline", "the whole method end to end (configs/demo.yaml)")
    p.add_argument("--config", default="configs/demo.yaml", help="YAML pipeline config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.overrides=[...]")
    p.set_defaults(func=_pipeline)
    return parser


def main(argv=None) -> int:
    from persllm_jax.platforms import cpu_alone_without_accelerators
    from persllm_jax.progress import quiet_foreign_bars

    quiet_foreign_bars()
    cpu_alone_without_accelerators()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("jax._src.xla_bridge", "absl", "datasets", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:  # a line per HTTP request (the annotator's thousands) only when asked for
        for chatty in ("httpx", "httpx2", "httpcore", "openai", "urllib3"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    from persllm_jax.configlib import ConfigError
    from persllm_jax.pipeline import PipelineError
    from persllm_jax.train.loop import TrainingStopped

    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, TrainingStopped, PipelineError) as err:
        print(f"persllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
