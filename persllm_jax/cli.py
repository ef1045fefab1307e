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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

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

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"persllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
