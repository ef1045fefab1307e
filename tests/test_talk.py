"""`persllm talk` on the real SmolLM2: agents alternate, each sees the other's turns as the user."""

import json
from pathlib import Path

import pytest

from persllm_jax import load_pretrained
from persllm_jax.inference.generation import Generator
from persllm_jax.inference.talk import TalkConfig, converse
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


class RecordingGenerator:
    """The real generator, keeping the conversations it was asked to continue."""

    def __init__(self, generator):
        self.generator, self.seen = generator, []

    def chat(self, conversations, params):
        self.seen.append(conversations[0])
        return self.generator.chat(conversations, params)


@pytest.mark.slow
def test_each_agent_sees_its_own_side(smollm2_gguf):
    model, tokenizer = load_pretrained(smollm2_gguf)
    gen = RecordingGenerator(Generator(model, tokenizer, max_batch=1))
    cfg = TalkConfig(out_dir="unused", turns=3, max_new_tokens=6, topic="tea")
    transcript = converse([gen, gen], ["<TIME-II> You are A.", "<TIME-I> You are B."], ["A", "B"], cfg)
    assert [t["speaker"] for t in transcript] == [0, 1, 0]
    first, second, third = gen.seen
    assert first[0]["content"] == "<TIME-II> You are A." and "talking with B" in first[1]["content"]
    assert second == [
        {"role": "system", "content": "<TIME-I> You are B."},
        {"role": "user", "content": transcript[0]["text"]},
    ]
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user"]
    assert third[2]["content"] == transcript[0]["text"] and third[3]["content"] == transcript[1]["text"]


@pytest.mark.slow
def test_talk_cli_writes_transcripts(smollm2_gguf, tmp_path):
    config = tmp_path / "talk.yaml"
    config.write_text(
        f"out_dir: {tmp_path / 'talk'}\n"
        f"agents:\n  - {{model: {smollm2_gguf}, persona: holmes, stage: early}}\n"
        f"  - {{model: {smollm2_gguf}, persona: elizabeth}}\n"
        f"personas_dir: {ROOT / 'examples' / 'personas'}\nturns: 2\nmax_new_tokens: 8\n"
    )
    run_cli("talk", "--config", config)
    lines = [json.loads(x) for x in (tmp_path / "talk" / "transcript.jsonl").read_text().splitlines()]
    assert [(t["persona"], t["stage"]) for t in lines] == [("holmes", "early"), ("elizabeth", "late")]
    md = (tmp_path / "talk" / "transcript.md").read_text()
    assert "**Sherlock Holmes** (early)" in md and "**Elizabeth Bennet** (late)" in md
    config.write_text(config.read_text().replace("persona: holmes", "persona: moriarty"))
    bad = run_cli("talk", "--config", config, check=False)
    assert bad.returncode == 2 and "unknown persona 'moriarty'" in bad.stderr
