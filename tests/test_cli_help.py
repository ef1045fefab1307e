"""`persllm <command> --help` says what each command does and, for every option, what it means and
its default."""

from __future__ import annotations

import argparse

from persllm_jax.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
    if prefix:
        yield prefix, parser


def test_every_option_has_a_meaning_and_its_default():
    commands = dict(_commands(build_parser()))
    assert {"build-data", "sft", "dpo", "serve", "chat", "eval", "talk", "pipeline"} <= {
        c[0] for c in commands
    }
    checked = 0
    for name, parser in commands.items():
        assert parser.description, f"persllm {' '.join(name)} has no description"
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"persllm {' '.join(name)} {action.dest}: no help"
            if action.option_strings and action.default not in (None, False):
                shown = parser._get_formatter()._expand_help(action)
                assert "default" in shown and str(action.default) in " ".join(text.split()), (
                    name,
                    action.dest,
                )
                checked += 1
    assert checked >= 15  # options with a default worth showing, across the commands
    serve = " ".join(commands[("serve",)].format_help().split())
    assert "--port PORT port to listen on (default: 8000)" in serve
    assert "(default: 16)" in serve and "(default: 15.0)" in serve and "(default: 512)" in serve
