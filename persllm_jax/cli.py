"""The `persllm` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys


def _import_hf(args) -> None:
    from persllm_jax import loading, tokens

    model, tokenizer = loading.load_pretrained(args.src, dtype=args.dtype)
    if args.add_tokens:
        if tokenizer is None:
            raise SystemExit(f"--add-tokens needs a tokenizer, and {args.src} has none")
        model = tokens.add_special_tokens(model, tokenizer, args.add_tokens.split(","))
    out = loading.save_model_dir(model, tokenizer, args.out)
    print(
        f"wrote {out} ({loading.count_params(model) / 1e6:.1f}M parameters, vocabulary {model.cfg.vocab_size})"
    )


def _export_hf(args) -> None:
    from persllm_jax import loading

    model, tokenizer = loading.load_pretrained(args.checkpoint, dtype=args.dtype)
    out = loading.save_pretrained(model, tokenizer, args.out)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _train(task: str):
    def run(args) -> None:
        from persllm_jax import configlib, trainer
        from persllm_jax.run_config import RunConfig

        cfg = configlib.load(RunConfig, args.config, args.overrides)
        if task == "sft":
            from persllm_jax.sft import SFTTask as make_task
        else:
            from persllm_jax.dpo import DPOTask as make_task
        run_dir = trainer.train(cfg, make_task)
        print(f"{task} finished: {run_dir} (metrics.jsonl, loss.png, checkpoints/)")

    return run


def _build_data(args) -> None:
    from data_builder.build import build
    from data_builder.config import BuildConfig
    from persllm_jax import configlib

    cfg = configlib.load(BuildConfig, args.config, args.overrides)
    stats = build(cfg)
    print(
        f"build-data finished: {cfg.out_dir}: {stats['dialogues']} dialogues, {stats['pairs']} pairs, "
        f"{stats['dropped']} seeds dropped, {stats['llm'].get('requests_sent', 0)} requests, "
        f"{stats['llm'].get('cache_hits', 0)} cache hits"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("build-data", help="persona materials -> persona dialogues and preference pairs")
    p.add_argument("--config", required=True, help="YAML build config (configs/data_*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. limits.seeds_per_stage=2")
    p.set_defaults(func=_build_data)

    for task, text in (("sft", "personified conversational SFT"), ("dpo", "DPO on preference pairs")):
        p = commands.add_parser(task, help=text)
        p.add_argument("--config", required=True, help=f"YAML run config (configs/{task}_*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=8")
        p.set_defaults(func=_train(task))

    p = commands.add_parser("import-hf", help="HF directory or .gguf file -> persllm model directory")
    p.add_argument("src", help="HF model directory or .gguf file")
    p.add_argument("out", help="output persllm model directory")
    p.add_argument(
        "--add-tokens", default="", help='comma-separated special tokens, e.g. "<TIME-I>,<TIME-II>"'
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.set_defaults(func=_import_hf)

    p = commands.add_parser("export-hf", help="persllm model directory or run checkpoint -> HF directory")
    p.add_argument("checkpoint", help="persllm model directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="output HF directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="exported dtype")
    p.set_defaults(func=_export_hf)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("jax._src.xla_bridge", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from persllm_jax.configlib import ConfigError
    from persllm_jax.trainer import TrainingStopped

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, TrainingStopped) as err:
        print(f"persllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
