"""Probe files: multiple-choice questions put to a persona at one stage of life.

A probe file is JSON Lines, one probe a line::

    {"id": "darwin-001", "persona": "darwin", "stage": "early", "category": "temporal",
     "question": "...", "choices": ["...", "..."], "answer": 1, "twin": "darwin-twin-01",
     "source": "early/knowledge.txt#3"}

`choices` are 2-4 replies in the persona's first person; `answer` indexes the reply consistent
with the persona at `stage`. Probes sharing a `twin` id ask one question with the same choices at
different stages of one persona and have different answers, so a model can only answer every
stage of a twin group right by reading the stage it is told it is at. `source` names the
materials file (and paragraph) the right answer rests on.

Every problem raises `ProbeFileError`, whose message starts with `file:line`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from persllm_jax.personas.json_lines import json_lines
from persllm_jax.personas.materials import Persona

CATEGORIES = ("temporal", "knowledge", "identity", "false_premise", "attitude")
PROBE_KEYS = ("id", "persona", "stage", "category", "question", "choices", "answer", "twin", "source")
REQUIRED_KEYS = ("id", "persona", "stage", "category", "question", "choices", "answer")
MIN_CHOICES, MAX_CHOICES = 2, 4
PROBES_FILE = "probes.jsonl"  # a persona folder's own probe set
# A second set, written from the materials alone by someone who saw neither the first set nor the
# reference dialogues: a check that the first set's scores are not an artefact of how it was written.
INDEPENDENT_PROBES_FILE = "probes_independent.jsonl"


class ProbeFileError(ValueError):
    """A malformed probe file; `path` and `line` (1-based) locate the problem."""

    def __init__(self, message: str, path: str | Path, line: int | None = None):
        self.path, self.line, self.reason = str(path), line, message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclasses.dataclass(frozen=True)
class Probe:
    id: str
    persona: str
    stage: str
    category: str
    question: str
    choices: tuple[str, ...]
    answer: int
    twin: str | None = None
    source: str | None = None
    file: str = ""  # where it was read, and its line: for messages
    line: int = 0


def _string(value, key: str, path: Path, line: int, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ProbeFileError(f"`{key}` must be a non-empty string, got {value!r}", path, line)
    return value


def parse_probe(record, personas: Mapping[str, Persona], path: Path, line: int) -> Probe:
    """One probe from its decoded JSON line, checked against the personas it may name."""
    if not isinstance(record, dict):
        raise ProbeFileError(f"a probe is a JSON object, got {type(record).__name__}", path, line)
    unknown = sorted(set(record) - set(PROBE_KEYS))
    if unknown:
        raise ProbeFileError(f"unknown keys {unknown}; a probe has {list(PROBE_KEYS)}", path, line)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ProbeFileError(f"missing keys {missing}", path, line)
    persona_id = _string(record["persona"], "persona", path, line)
    if persona_id not in personas:
        raise ProbeFileError(
            f"unknown persona {persona_id!r}; the personas directory has {sorted(personas)}", path, line
        )
    stage = _string(record["stage"], "stage", path, line)
    stages = [s.id for s in personas[persona_id].stages]
    if stage not in stages:
        raise ProbeFileError(
            f"unknown stage {stage!r} of persona {persona_id!r}; its stages are {stages}", path, line
        )
    category = record["category"]
    if category not in CATEGORIES:
        raise ProbeFileError(f"unknown category {category!r}; categories are {list(CATEGORIES)}", path, line)
    choices = record["choices"]
    if not isinstance(choices, list) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise ProbeFileError(
            f"`choices` must be a list of {MIN_CHOICES}-{MAX_CHOICES} replies, got {choices!r}", path, line
        )
    for i, choice in enumerate(choices):
        _string(choice, f"choices[{i}]", path, line)
    if len({c.strip() for c in choices}) != len(choices):
        raise ProbeFileError("two choices are the same reply", path, line)
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ProbeFileError(
            f"answer {answer!r} is out of range: it indexes `choices` (0 to {len(choices) - 1})", path, line
        )
    return Probe(
        id=_string(record["id"], "id", path, line),
        persona=persona_id,
        stage=stage,
        category=category,
        question=_string(record["question"], "question", path, line),
        choices=tuple(choices),
        answer=answer,
        twin=_string(record.get("twin"), "twin", path, line, optional=True),
        source=_string(record.get("source"), "source", path, line, optional=True),
        file=str(path),
        line=line,
    )


def _twin_error(twin: str, first: Probe, reason: str, probe: Probe) -> None:
    raise ProbeFileError(
        f"twin group {twin!r}: {reason} (its first probe is {first.id} at {first.file}:{first.line})",
        probe.file,
        probe.line,
    )


def check_twins(probes: Iterable[Probe]) -> None:
    """A twin group: one persona, one question and choice list, a different stage and a different
    answer for each of its probes, at least two of them."""
    groups: dict[str, list[Probe]] = defaultdict(list)
    for probe in probes:
        if probe.twin is not None:
            groups[probe.twin].append(probe)
    for twin, members in groups.items():
        first = members[0]
        fail = functools.partial(_twin_error, twin, first)
        if len(members) < 2:
            fail("has one probe; a twin group asks its question at two or more stages", first)
        seen_stages, seen_answers = {first.stage}, {first.answer}
        for probe in members[1:]:
            if probe.persona != first.persona:
                fail(f"persona {probe.persona!r} differs from {first.persona!r}", probe)
            if probe.question != first.question:
                fail("the question differs; twins ask the same question", probe)
            if probe.choices != first.choices:
                fail("the choices differ; twins offer the same choices in the same order", probe)
            if probe.stage in seen_stages:
                fail(f"stage {probe.stage!r} appears twice; twins are at different stages", probe)
            if probe.answer in seen_answers:
                fail(f"answer {probe.answer} is the same at two stages; twins differ in their answer", probe)
            seen_stages.add(probe.stage)
            seen_answers.add(probe.answer)


def read_probes(paths: Iterable[str | Path], personas: Iterable[Persona]) -> list[Probe]:
    """Every probe of the files, checked (keys, persona, stage, answer, unique ids, twin groups)."""
    personas = {p.id: p for p in personas}
    probes: list[Probe] = []
    where: dict[str, Probe] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ProbeFileError("no such probe file", path)
        for line, record in json_lines(path, ProbeFileError):
            probe = parse_probe(record, personas, path, line)
            if probe.id in where:
                first = where[probe.id]
                raise ProbeFileError(
                    f"probe id {probe.id!r} is used before, at {first.file}:{first.line}", path, line
                )
            where[probe.id] = probe
            probes.append(probe)
        if not any(p.file == str(path) for p in probes):
            raise ProbeFileError("holds no probes", path)
    check_twins(probes)
    return probes


def persona_probe_files(
    personas_dir: str | Path, persona_ids: Iterable[str], file_name: str = PROBES_FILE
) -> list[Path]:
    """The probe set each of these personas ships in its folder (`<id>/probes.jsonl`, or another
    `file_name`), where it has one."""
    root = Path(personas_dir)
    return [root / pid / file_name for pid in persona_ids if (root / pid / file_name).is_file()]
