"""Reference dialogues: persona dialogues written by hand from a persona's materials, shipped as
`<personas_dir>/<persona>/reference.jsonl` in the format build-data writes, with
`"origin": "reference"`.

A record holds `id`, `persona`, `stage`, `kind` (`ordinary`, `opinion` or `induced`: a false
premise corrected in character), `messages` (the persona's system message for the stage, in any
`stage_prompt` style and read as the persona's own; one user question; one assistant answer),
`analysis` (the reasoning step before the answer), `seed_id` (the
materials paragraph the answer rests on, `<persona>/<stage>/<kind>/<nnn>`), `group` (a shared id on
the dialogues that ask one question at different stages, else null) and `origin`. Every problem
raises `MaterialsError` naming the file and line.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from persllm_jax.personas.json_lines import json_lines
from persllm_jax.personas.materials import STAGE_PROMPTS, MaterialsError, Persona
from persllm_jax.personas.prompts import system_prompt

REFERENCE_FILE = "reference.jsonl"
KEYS = ("id", "persona", "stage", "kind", "messages", "analysis", "seed_id", "group", "origin")
KINDS = ("ordinary", "opinion", "induced")


def _check(record, persona: Persona, paragraph_ids: set[str], path: Path, line: int) -> dict:
    def fail(reason: str):
        raise MaterialsError(reason, path, line)

    if not isinstance(record, dict) or set(record) != set(KEYS):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        fail(f"a reference dialogue has exactly the keys {list(KEYS)}, got {got}")
    if record["persona"] != persona.id:
        fail(f"persona {record['persona']!r} in the folder of persona {persona.id!r}")
    try:
        stage = persona.stage(record["stage"])
    except KeyError as err:
        fail(err.args[0])
    if record["kind"] not in KINDS:
        fail(f"unknown kind {record['kind']!r}; kinds are {list(KINDS)}")
    if record["origin"] != "reference":
        fail(f'origin must be "reference", got {record["origin"]!r}')
    messages = record["messages"]
    roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
    if roles != ["system", "user", "assistant"] or not all(
        isinstance(m.get("content"), str) and m["content"].strip() for m in messages
    ):
        fail("messages must be a system message, a user question and an assistant answer, none empty")
    # Written in any stage_prompt style; read in the persona's own, so that a persona switched to
    # another style keeps its reference files.
    styles = {
        system_prompt(persona, stage, style) for style in STAGE_PROMPTS if style == "token" or stage.when
    }
    if messages[0]["content"] not in styles:
        fail(
            f"the system message is not the persona's for stage {stage.id!r}: {system_prompt(persona, stage)!r}"
        )
    messages[0]["content"] = system_prompt(persona, stage)
    if not isinstance(record["analysis"], str) or not record["analysis"].strip():
        fail("analysis must be a non-empty string")
    seed = record["seed_id"]
    if seed not in paragraph_ids or not seed.startswith(f"{persona.id}/{stage.id}/"):
        fail(f"seed_id {seed!r} is not a materials paragraph of stage {stage.id!r}")
    if record["group"] is not None and not (isinstance(record["group"], str) and record["group"]):
        fail(f"group must be a non-empty string or null, got {record['group']!r}")
    return record


def read_reference_dialogues(path: str | Path, persona: Persona) -> list[dict]:
    """A persona's reference dialogues, checked; a group is one question asked at different stages."""
    path = Path(path)
    paragraph_ids = {p.id for p in persona.paragraphs}
    records, seen, lines = [], {}, {}
    for line, record in json_lines(path, MaterialsError):
        record = _check(record, persona, paragraph_ids, path, line)
        if record["id"] in seen:
            raise MaterialsError(
                f"id {record['id']!r} is used before, on line {seen[record['id']]}", path, line
            )
        seen[record["id"]] = line
        lines[id(record)] = line
        records.append(record)
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record["group"] is not None:
            groups[record["group"]].append(record)
    for group, members in groups.items():
        where = lines[id(members[-1])]
        if len({m["stage"] for m in members}) != len(members) or len(members) < 2:
            raise MaterialsError(
                f"group {group!r} must ask its question once at each of two or more stages", path, where
            )
        if len({m["messages"][1]["content"] for m in members}) != 1:
            raise MaterialsError(f"group {group!r} asks different questions; a group asks one", path, where)
    return records


def reference_file(personas_dir: str | Path, persona_id: str) -> Path | None:
    """The persona's reference dialogues, where it ships them."""
    path = Path(personas_dir) / persona_id / REFERENCE_FILE
    return path if path.is_file() else None
