"""`persllm chat`: persona system prompts, the REPL's history and commands, the real CLI on SmolLM2."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persllm_jax.inference.chat import ChatSession, repl
from persllm_jax.inference.generation import SamplingParams
from persllm_jax.personas.prompts import persona_system_message, persona_system_prompt
from tests.cli_helpers import run_cli
from tests.echo_generator import EchoGenerator

ROOT = Path(__file__).resolve().parents[1]
PERSONAS = ROOT / "examples" / "personas"


def test_persona_system_message():
    system, persona, stage = persona_system_message(PERSONAS, "holmes", "early")
    assert stage.id == "early" and system.startswith("<TIME-I> You are Sherlock Holmes.")
    assert system == persona_system_prompt(
        token="<TIME-I>", name=persona.name, description=persona.description
    )
    _, _, latest = persona_system_message(PERSONAS, "holmes")
    assert latest.id == "late", "without --stage the persona's last stage is used"
    with pytest.raises(ValueError, match="darwin, elizabeth, holmes"):
        persona_system_message(PERSONAS, "moriarty")
    with pytest.raises(ValueError, match="its stages: early, late"):
        persona_system_message(PERSONAS, "holmes", "middle")


def run_repl(session, text: str) -> str:
    out = io.StringIO()
    repl(session, stdin=io.StringIO(text), stdout=out)
    return out.getvalue()


def test_repl_keeps_history_resets_and_exits():
    session = ChatSession(EchoGenerator(delay_s=0), SamplingParams(max_new_tokens=20), system="sys")
    out = run_repl(session, "hello\n\nagain\n/reset\nthird\n/exit\nnever\n")
    assert out == "echo: hello\necho: again\necho: third\n"
    assert session.messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "echo: third"},
    ]
    assert run_repl(session, "last") == "echo: last\n", "end of input quits after the reply"


def test_repl_drops_old_turns_that_no_longer_fit(capsys):
    session = ChatSession(EchoGenerator(delay_s=0), SamplingParams(max_new_tokens=10))
    out = run_repl(session, "aaaa\nbbbb\ncccc\ndddd\n")
    assert out.splitlines() == ["echo: aaaa", "echo: bbbb", "echo: cccc", "echo: dddd"]
    assert session.messages()[0] == {"role": "user", "content": "cccc"}  # older turns were dropped
    assert run_repl(session, "x" * 60 + "\n") == ""
    assert "exceeds the model's 64 positions" in capsys.readouterr().err
    assert session.messages()[-1] == {"role": "assistant", "content": "echo: dddd"}  # nothing kept


@pytest.mark.parametrize(
    "args, words",
    [
        (["--persona", "moriarty"], "valid personas: darwin, elizabeth, holmes"),
        (["--persona", "holmes", "--stage", "middle"], "its stages: early, late"),
        (["--stage", "early"], "--stage needs --persona"),
    ],
)
def test_chat_cli_rejects_unknown_persona_or_stage(args, words, tmp_path):
    result = run_cli("chat", tmp_path / "no-model-needed", *args, "--personas-dir", PERSONAS, check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr


@pytest.mark.slow
def test_chat_cli_on_smollm2_through_a_pipe(smollm2_gguf):
    # Greedy: after /reset the first question gets the same reply again; /exit stops before "never".
    lines = "Hello, who are you?\nWhere do you live?\n/reset\nHello, who are you?\n/exit\nnever\n"
    result = subprocess.run(
        [sys.executable, "-m", "persllm_jax.cli", "chat", smollm2_gguf]
        + ["--persona", "holmes", "--stage", "early", "--max-new-tokens", "8", "--temperature", "0"],
        input=lines,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "chatting with Sherlock Holmes, stage early" in result.stderr
    out = result.stdout
    first = [out[:i] for i in range(1, len(out)) if out[i] == "\n" and out.endswith("\n" + out[:i] + "\n")]
    assert any(len(out) > 2 * len(r) + 2 for r in first), f"expected R1, R2, R1 on stdout:\n{out!r}"
