"""The package's architecture, read from its imports with `ast`: each layer may import only the
layers below it, `persllm_jax` never imports `data_builder` (which is a face over it), every
import is absolute, and no module grows past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A unit (a subpackage, or a top-level module of persllm_jax) may import its own
# modules and those of lower layers: never a higher layer, nor another unit of its own layer.
LAYERS: list[tuple[str, ...]] = [
    ("configlib", "losses", "platforms", "progress"),
    ("model", "data", "personas", "llm"),
    ("io",),
    ("train", "inference"),
    ("builder", "evaluation"),
    ("pipeline",),
    ("cli",),
]
FACE = "persllm_jax"  # persllm_jax/__init__.py: the public API, above every layer
MAX_LINES = 500


def rank_of(unit: str) -> int:
    if unit == FACE:
        return len(LAYERS)
    for rank, units in enumerate(LAYERS):
        if unit in units:
            return rank
    raise KeyError(unit)


def unit_of(module: str, units: set[str]) -> str:
    """`persllm_jax.train.tasks.dpo` -> `train`; `persllm_jax` itself -> the face."""
    parts = module.split(".")
    if len(parts) == 1:
        return FACE
    return parts[1] if parts[1] in units else FACE


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, module, imported names) for every import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append((node.lineno, module, tuple(alias.name for alias in node.names)))
    return found


def check_tree(root: Path) -> tuple[list[str], int]:
    """(violations, number of internal imports checked) for the packages under `root`."""
    package = root / "persllm_jax"
    units = {p.stem for p in package.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    units.discard("__init__")
    problems, checked = [], 0
    for unit in sorted(units):
        try:
            rank_of(unit)
        except KeyError:
            problems.append(f"persllm_jax/{unit} is in no layer of tests/test_layout.py")
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(root)
        source = unit_of(module_name(path, root), units)
        for line, module, names in imports(path):
            if module.startswith("."):
                problems.append(f"{where}:{line}: relative import {module!r}; import absolutely")
                continue
            top = module.split(".")[0]
            if top == "data_builder":
                problems.append(f"{where}:{line}: persllm_jax imports data_builder ({module})")
                continue
            if top != "persllm_jax":
                continue
            targets = {unit_of(module, units)}
            if module == "persllm_jax":  # `from persllm_jax import x`: x is a unit or a public name
                targets = {name if name in units else FACE for name in names}
            for target in targets:
                checked += 1
                if target == source or source == FACE:
                    continue
                if rank_of(target) >= rank_of(source):
                    problems.append(
                        f"{where}:{line}: {source} (layer {rank_of(source)}) imports {target} "
                        f"(layer {rank_of(target)}) via {module}"
                    )
    builder_face = root / "data_builder"
    if builder_face.is_dir():
        for path in sorted(builder_face.rglob("*.py")):
            for line, module, _ in imports(path):
                if module.startswith("."):
                    problems.append(f"{path.relative_to(root)}:{line}: relative import {module!r}")
    return problems, checked


def test_layers_point_one_way():
    problems, checked = check_tree(ROOT)
    assert checked > 100, f"only {checked} internal imports found: is the scan reading the package?"
    assert not problems, "\n".join(problems)


def test_data_builder_is_a_face_over_persllm_jax():
    used = {module for path in (ROOT / "data_builder").rglob("*.py") for _, module, _ in imports(path)}
    assert any(m.startswith("persllm_jax.builder") for m in used), used


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_check_catches_an_upward_a_sideways_and_a_cross_package_import(tmp_path):
    _write(
        tmp_path,
        {
            "persllm_jax/__init__.py": "",
            "persllm_jax/configlib.py": "",
            "persllm_jax/model/__init__.py": "",
            "persllm_jax/model/decoder.py": "def f():\n    from persllm_jax.train import loop\n",
            "persllm_jax/data/__init__.py": "from persllm_jax import personas\n",
            "persllm_jax/personas/__init__.py": "import data_builder\n",
            "persllm_jax/train/__init__.py": "from persllm_jax.model import decoder\nfrom . import loop\n",
            "persllm_jax/train/loop.py": "from persllm_jax import configlib\n",
            "persllm_jax/gadgets.py": "",
        },
    )
    problems, checked = check_tree(tmp_path)
    text = "\n".join(problems)
    assert checked == 4, problems
    assert "persllm_jax/model/decoder.py:2: model (layer 1) imports train (layer 3)" in text
    assert "persllm_jax/data/__init__.py:1: data (layer 1) imports personas (layer 1)" in text
    assert "persllm_jax/personas/__init__.py:1: persllm_jax imports data_builder" in text
    assert "persllm_jax/train/__init__.py:2: relative import '.'" in text
    assert "persllm_jax/gadgets is in no layer" in text
    assert len(problems) == 5, problems


@pytest.mark.parametrize("folder", ["persllm_jax", "data_builder", "tests", "benchmarks"])
def test_no_module_over_500_lines(folder):
    sizes = {p: len(p.read_text().splitlines()) for p in (ROOT / folder).rglob("*.py")}
    assert sizes, f"no Python files under {folder}"
    too_long = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, too_long
