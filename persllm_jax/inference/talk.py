"""`persllm talk`: two personified agents hold a conversation on a topic.

Each agent sees the conversation from its own side: its persona's system prompt (stage token
first, as in training), its own turns as the assistant and the other agent's turns as the user.
The agents may be two personas or stages of one model, or two models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from persllm_jax.configlib import ConfigError
from persllm_jax.inference.generation import Generator
from persllm_jax.inference.sampling import PERSONA_SAMPLING, SamplingParams
from persllm_jax.io import pretrained
from persllm_jax.personas.prompts import persona_system_message


@dataclasses.dataclass(frozen=True)
class Agent:
    model: str  # HF dir, .gguf file, persllm model dir or run dir
    persona: str
    stage: str = ""  # "" = the persona's last stage


@dataclasses.dataclass(frozen=True)
class TalkConfig:
    out_dir: str
    agents: tuple[Agent, ...] = ()
    topic: str = "what a person can learn from careful observation"
    turns: int = 6  # replies in all, the agents taking turns; the first agent opens
    personas_dir: str = "examples/personas"
    max_new_tokens: int = 120
    temperature: float = PERSONA_SAMPLING.temperature
    top_p: float = PERSONA_SAMPLING.top_p
    top_k: int = PERSONA_SAMPLING.top_k
    repetition_penalty: float = PERSONA_SAMPLING.repetition_penalty
    seed: int = 0
    dtype: str = "float32"


OPENING = "You are talking with {other}. Start the conversation about this topic, in a few sentences: {topic}"


def converse(
    generators: list[Generator], system_prompts: list[str], names: list[str], cfg: TalkConfig
) -> list[dict]:
    """The transcript: [{"turn", "speaker", "text"}], agents alternating, agent 0 first."""
    turns: list[tuple[int, str]] = []
    for turn in range(cfg.turns):
        me = turn % 2
        other = 1 - me
        messages = [{"role": "system", "content": system_prompts[me]}]
        messages.append({"role": "user", "content": OPENING.format(other=names[other], topic=cfg.topic)})
        if me == 1:  # agent 1 never saw the opening instruction: the first line it hears is agent 0's
            messages.pop()
        for speaker, text in turns:
            messages.append({"role": "assistant" if speaker == me else "user", "content": text})
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=cfg.repetition_penalty,
            seed=cfg.seed + turn,
        )
        reply = generators[me].chat([messages], params)[0].text.strip()
        turns.append((me, reply))
    return [{"turn": i + 1, "speaker": s, "text": t} for i, (s, t) in enumerate(turns)]


def talk(cfg: TalkConfig) -> dict[str, Path]:
    if len(cfg.agents) != 2:
        raise ConfigError(f"agents: give exactly two agents, got {len(cfg.agents)}")
    if cfg.turns < 1:
        raise ConfigError(f"turns must be >= 1, got {cfg.turns}")
    # (system prompt, persona, stage) per agent, as `persllm chat` sets a persona up
    identities = [persona_system_message(cfg.personas_dir, a.persona, a.stage or None) for a in cfg.agents]
    loaded: dict[str, Generator] = {}
    for agent in cfg.agents:
        if agent.model not in loaded:
            model, tokenizer = pretrained.load_pretrained(agent.model, dtype=jnp.dtype(cfg.dtype))
            loaded[agent.model] = Generator(model, tokenizer, max_batch=1)
    generators = [loaded[a.model] for a in cfg.agents]
    systems = [system for system, _, _ in identities]
    names = [p.name for _, p, _ in identities]
    transcript = converse(generators, systems, names, cfg)
    for line in transcript:
        agent, (_, persona, stage) = cfg.agents[line["speaker"]], identities[line["speaker"]]
        line.update(name=persona.name, persona=persona.id, stage=stage.id, model=agent.model)
    return write_transcript(Path(cfg.out_dir), transcript, cfg.topic)


def write_transcript(out: Path, transcript: list[dict], topic: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "transcript.jsonl", out / "transcript.md"
    jsonl.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in transcript))
    speakers = dict.fromkeys(f"{t['name']} ({t['stage']})" for t in transcript)
    lines = [f"# {' and '.join(speakers)}", "", f"Topic: {topic}", ""]
    for t in transcript:
        lines += [f"**{t['name']}** ({t['stage']}): {t['text']}", ""]
    md.write_text("\n".join(lines))
    return {"jsonl": jsonl, "md": md}
