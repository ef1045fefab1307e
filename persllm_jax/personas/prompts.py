"""What a personified model is told it is: the system prompt of a persona at one stage of life,
and finding a persona and stage by id in a personas directory."""

from __future__ import annotations

from pathlib import Path

from persllm_jax.personas.materials import STAGE_PROMPTS, Persona, Stage, load_personas

# Where `persllm chat` and `talk` look for personas by default when ./examples/personas is absent:
# the examples beside this source tree (a development checkout).
REPO_PERSONAS = Path(__file__).resolve().parents[2] / "examples" / "personas"


def persona_system_prompt(
    *, token: str, name: str, description: str, when: str = "", stage_prompt: str = "token"
) -> str:
    """The system message of a persona dialogue. The stage token comes first, so that the model
    reads which stage of the life it speaks from before anything else; with `token_and_when` the
    stage's `when` line follows it, which names the stage in words the model already reads."""
    if stage_prompt not in STAGE_PROMPTS:
        raise ValueError(f"unknown stage_prompt {stage_prompt!r}; valid values: {', '.join(STAGE_PROMPTS)}")
    stage = token if stage_prompt == "token" else f"{token} {when.rstrip('.')}."
    return f"{stage} You are {name}. {description}".strip()


def system_prompt(persona: Persona, stage: Stage, stage_prompt: str | None = None) -> str:
    """`persona`'s system prompt at `stage`, in the persona's own `stage_prompt` unless one is given."""
    return persona_system_prompt(
        token=stage.token,
        name=persona.name,
        description=persona.description,
        when=stage.when,
        stage_prompt=stage_prompt or persona.stage_prompt,
    )


def persona_conversation(persona: Persona, stage: Stage, question: str) -> list[dict]:
    """A one-question conversation addressed to `persona` at `stage`."""
    return [
        {"role": "system", "content": system_prompt(persona, stage)},
        {"role": "user", "content": question},
    ]


def resolve_personas_dir(personas_dir: str | Path | None) -> Path:
    """The given folder; by default ./examples/personas, else the one beside this source tree."""
    if personas_dir:
        return Path(personas_dir)
    local = Path("examples/personas")
    return local if local.is_dir() or not REPO_PERSONAS.is_dir() else REPO_PERSONAS


def persona_system_message(personas_dir: str | Path | None, persona_id: str, stage_id: str | None = None):
    """(system prompt, persona, stage) for a persona id; without `stage_id`, its last (latest) stage.

    Unknown ids raise ValueError listing the valid ones.
    """
    folder = resolve_personas_dir(personas_dir)
    personas = {p.id: p for p in load_personas(folder)}
    if persona_id not in personas:
        raise ValueError(f"unknown persona {persona_id!r} in {folder}; valid personas: {', '.join(personas)}")
    persona = personas[persona_id]
    if stage_id is None:
        stage = persona.stages[-1]
    else:
        try:
            stage = persona.stage(stage_id)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
    return system_prompt(persona, stage), persona, stage
