"""Persona materials: loading and validating a personas directory.

Layout::

    <personas_dir>/<persona_id>/persona.yaml
    <personas_dir>/<persona_id>/<stage_id>/{knowledge,experiences,speech}.txt

`persona.yaml` holds `name`, `description`, `language`, `stage_prompt` and `stages`, a list of
`{id, token, when}` entries. `stage_prompt` says how the system prompt names the stage: `token`
(the stage token alone, the default) or `token_and_when` (the token, then the stage's `when`
line). Each materials file holds paragraphs separated by blank lines.
Knowledge and experiences are the *objective* store (what the persona knows and lived);
speech records are the *subjective* store (how the persona speaks). Every problem raises `MaterialsError`, whose message starts with the
file (and line, where there is one) at fault.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

PERSONA_FILE = "persona.yaml"
KINDS = ("knowledge", "experiences", "speech")
CATEGORY = {"knowledge": "objective", "experiences": "objective", "speech": "subjective"}
PERSONA_KEYS = ("name", "description", "language", "stage_prompt", "stages")
PERSONA_REQUIRED = ("name", "stages")
STAGE_KEYS = ("id", "token", "when")
STAGE_REQUIRED = ("id", "token")
DEFAULT_LANGUAGE = "en"
STAGE_PROMPTS = ("token", "token_and_when")

_TOKEN = re.compile(r"<[^<>\s]+>")
_STAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class MaterialsError(ValueError):
    """Malformed persona materials. `path` and `line` (1-based, or None) locate the problem."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(message if where is None else f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Paragraph:
    id: str  # "<persona>/<stage>/<kind>/<nnn>", nnn counting from 001 in file order
    persona: str
    stage: str
    kind: str  # "knowledge" | "experiences" | "speech"
    category: str  # "objective" | "subjective"
    text: str  # line breaks inside the paragraph collapsed into single spaces
    source: str  # the materials file it came from
    line: int  # 1-based line where the paragraph starts

    @property
    def n_words(self) -> int:
        return len(self.text.split())


@dataclasses.dataclass(frozen=True)
class Stage:
    id: str
    token: str
    when: str
    paragraphs: tuple[Paragraph, ...]

    def of_kind(self, kind: str) -> tuple[Paragraph, ...]:
        if kind not in KINDS:
            raise ValueError(f"unknown materials kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        return tuple(p for p in self.paragraphs if p.kind == kind)


@dataclasses.dataclass(frozen=True)
class Persona:
    id: str
    name: str
    description: str
    language: str
    stages: tuple[Stage, ...]
    stage_prompt: str = "token"  # one of STAGE_PROMPTS

    def stage(self, stage_id: str) -> Stage:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        valid = ", ".join(s.id for s in self.stages)
        raise KeyError(f"persona {self.id!r} has no stage {stage_id!r}; its stages: {valid}")

    @property
    def paragraphs(self) -> tuple[Paragraph, ...]:
        return tuple(p for stage in self.stages for p in stage.paragraphs)


# --------------------------------------------------------------------------------------------
# public helpers


def objective(paragraphs: Iterable[Paragraph]) -> list[Paragraph]:
    """The objective store: knowledge and experiences paragraphs, in order."""
    return [p for p in paragraphs if p.category == "objective"]


def subjective(paragraphs: Iterable[Paragraph]) -> list[Paragraph]:
    """The subjective store: speech records, in order."""
    return [p for p in paragraphs if p.category == "subjective"]


def stage_tokens(personas: Iterable[Persona]) -> list[str]:
    """Every distinct stage token, in order of first appearance."""
    seen: dict[str, None] = {}
    for persona in personas:
        for stage in persona.stages:
            seen.setdefault(stage.token, None)
    return list(seen)


def all_paragraphs(personas: Iterable[Persona]) -> list[Paragraph]:
    return [p for persona in personas for p in persona.paragraphs]


def load_personas(personas_dir: str | Path) -> list[Persona]:
    """Every persona folder under `personas_dir` (sorted by folder name), validated."""
    root = Path(personas_dir)
    if not root.is_dir():
        raise MaterialsError("personas directory does not exist or is not a directory", root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not folders:
        raise MaterialsError("no persona folders found (expected <persona_id>/persona.yaml)", root)
    return [load_persona(folder) for folder in folders]


def load_persona(persona_dir: str | Path) -> Persona:
    """One persona folder: persona.yaml plus one folder of materials per stage."""
    folder = Path(persona_dir)
    persona_id = folder.name
    yaml_path = folder / PERSONA_FILE
    if not yaml_path.is_file():
        raise MaterialsError(f"missing {PERSONA_FILE} for persona {persona_id!r}", yaml_path)
    meta = _read_persona_yaml(yaml_path)

    declared = {s["id"] for s in meta["stages"]}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if sub.name not in declared:
            raise MaterialsError(
                f"unknown stage {sub.name!r}: folder has no entry in {yaml_path}; "
                f"declared stages: {', '.join(s['id'] for s in meta['stages'])}",
                sub,
            )

    stages = []
    for entry in meta["stages"]:
        stage_dir = folder / entry["id"]
        if not stage_dir.is_dir():
            raise MaterialsError(
                f"stage {entry['id']!r} has no folder {stage_dir} (expected {', '.join(_files())})",
                yaml_path,
                entry["line"],
            )
        stages.append(_load_stage(persona_id, entry, stage_dir))
    return Persona(
        id=persona_id,
        name=meta["name"],
        description=meta["description"],
        language=meta["language"],
        stages=tuple(stages),
        stage_prompt=meta["stage_prompt"],
    )


# --------------------------------------------------------------------------------------------
# persona.yaml


def _files() -> list[str]:
    return [f"{kind}.txt" for kind in KINDS]


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _value(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _mapping(node: yaml.Node, path: Path, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise MaterialsError(f"{what} must be a mapping of keys to values", path, _line(node))
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = _value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise MaterialsError(f"{what}: keys must be plain strings", path, _line(key_node))
        if key in out:
            raise MaterialsError(f"{what}: duplicate key {key!r}", path, _line(key_node))
        out[key] = (key_node, value_node)
    return out


def _check_keys(
    mapping: dict[str, tuple[yaml.Node, yaml.Node]],
    valid: tuple[str, ...],
    required: tuple[str, ...],
    path: Path,
    what: str,
    line: int,
) -> None:
    for key, (key_node, _) in mapping.items():
        if key not in valid:
            raise MaterialsError(
                f"{what}: unknown key {key!r}; valid keys: {', '.join(valid)}", path, _line(key_node)
            )
    for key in required:
        if key not in mapping:
            raise MaterialsError(
                f"{what}: missing required field {key!r} (required: {', '.join(required)})", path, line
            )


def _text(node: yaml.Node, path: Path, what: str, allow_empty: bool = False) -> str:
    value = _value(node)
    if value is None and allow_empty:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MaterialsError(f"{what} must be a string", path, _line(node))
    text = str(value).strip()
    if not text and not allow_empty:
        raise MaterialsError(f"{what} must not be empty", path, _line(node))
    return text


def _read_persona_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise MaterialsError(
            f"invalid YAML: {problem}", path, None if mark is None else mark.line + 1
        ) from exc
    if root is None:
        raise MaterialsError(
            f"{PERSONA_FILE} is empty; required fields: {', '.join(PERSONA_REQUIRED)}", path, None
        )
    top = _mapping(root, path, PERSONA_FILE)
    _check_keys(top, PERSONA_KEYS, PERSONA_REQUIRED, path, PERSONA_FILE, _line(root))

    name = _text(top["name"][1], path, "'name'")
    description = _text(top["description"][1], path, "'description'", True) if "description" in top else ""
    language = DEFAULT_LANGUAGE
    if "language" in top:
        language = _text(top["language"][1], path, "'language'")

    stage_prompt = STAGE_PROMPTS[0]
    if "stage_prompt" in top:
        stage_prompt = _text(top["stage_prompt"][1], path, "'stage_prompt'")
        if stage_prompt not in STAGE_PROMPTS:
            raise MaterialsError(
                f"'stage_prompt' is {stage_prompt!r}; valid values: {', '.join(STAGE_PROMPTS)}",
                path,
                _line(top["stage_prompt"][1]),
            )

    stages_node = top["stages"][1]
    if not isinstance(stages_node, yaml.SequenceNode) or not stages_node.value:
        raise MaterialsError(
            "'stages' must be a non-empty list of {id, token, when} entries", path, _line(stages_node)
        )
    stages: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for index, node in enumerate(stages_node.value):
        what = f"stages[{index}]"
        entry = _mapping(node, path, what)
        _check_keys(entry, STAGE_KEYS, STAGE_REQUIRED, path, what, _line(node))
        stage_id = _text(entry["id"][1], path, f"{what}.id")
        id_line = _line(entry["id"][1])
        if not _STAGE_ID.fullmatch(stage_id):
            raise MaterialsError(
                f"{what}.id {stage_id!r} must be a folder name (letters, digits, '_', '-', '.')",
                path,
                id_line,
            )
        if stage_id in ids:
            raise MaterialsError(
                f"duplicate stage id {stage_id!r} (first declared on line {ids[stage_id]})", path, id_line
            )
        ids[stage_id] = id_line
        token = _text(entry["token"][1], path, f"{what}.token")
        token_line = _line(entry["token"][1])
        if not _TOKEN.fullmatch(token):
            raise MaterialsError(
                f"{what}.token {token!r} must look like <NAME>: '<', no spaces or angle brackets, '>'",
                path,
                token_line,
            )
        if token in tokens:
            raise MaterialsError(
                f"duplicate stage token {token!r} (first used on line {tokens[token]})", path, token_line
            )
        tokens[token] = token_line
        when = _text(entry["when"][1], path, f"{what}.when", True) if "when" in entry else ""
        if stage_prompt == "token_and_when" and not when:
            raise MaterialsError(
                f"{what} has no 'when' line, which stage_prompt: token_and_when writes after the token",
                path,
                _line(node),
            )
        stages.append({"id": stage_id, "token": token, "when": when, "line": _line(node)})
    return {
        "name": name,
        "description": description,
        "language": language,
        "stage_prompt": stage_prompt,
        "stages": stages,
    }


# --------------------------------------------------------------------------------------------
# materials files


def _read_text(path: Path) -> str:
    """UTF-8 text (a leading BOM is dropped) with '\\n' line endings."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MaterialsError(
            f"not valid UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} ({exc.reason}); "
            "save the file as UTF-8",
            path,
            line,
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_paragraphs(text: str) -> list[tuple[int, str]]:
    """(1-based start line, text) per paragraph; blank (whitespace-only) lines separate paragraphs,
    the lines of one paragraph are stripped and joined with single spaces."""
    out: list[tuple[int, str]] = []
    start = 0
    lines: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if line:
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            out.append((start, " ".join(lines)))
            lines = []
    if lines:
        out.append((start, " ".join(lines)))
    return out


def _load_stage(persona_id: str, entry: dict[str, Any], stage_dir: Path) -> Stage:
    expected = set(_files())
    for path in sorted(stage_dir.glob("*.txt")):
        if path.name not in expected:
            raise MaterialsError(
                f"unknown materials file {path.name!r}; valid files: {', '.join(_files())}", path
            )
    paragraphs: list[Paragraph] = []
    for kind in KINDS:
        path = stage_dir / f"{kind}.txt"
        if not path.is_file():
            raise MaterialsError(f"missing materials file {path.name} for stage {entry['id']!r}", path)
        parts = split_paragraphs(_read_text(path))
        if not parts:
            raise MaterialsError("empty materials file: no non-blank paragraph", path)
        for index, (line, text) in enumerate(parts, start=1):
            paragraphs.append(
                Paragraph(
                    id=f"{persona_id}/{entry['id']}/{kind}/{index:03d}",
                    persona=persona_id,
                    stage=entry["id"],
                    kind=kind,
                    category=CATEGORY[kind],
                    text=text,
                    source=str(path),
                    line=line,
                )
            )
    return Stage(id=entry["id"], token=entry["token"], when=entry["when"], paragraphs=tuple(paragraphs))
