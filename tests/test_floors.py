"""The floors hold: every module imports only from its own floor or below, the library imports no Ray
or web framework, and the storage primitives are written once, in motiondirector/storage.py.

Read from the source with `ast` (nothing is imported), including imports inside functions: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("motiondirector", "pipelines", "serve")

# The floors of ../shared/docs/architecture.md, split where one of its floors holds packages that depend on
# each other (data flows files -> clips -> records -> training -> packages -> catalog -> generation).
# A unit is a top-level module or package of motiondirector/, or pipelines/ / serve/. A unit may
# import its own floor and the floors below; never one above.
FLOORS: list[tuple[str, set[str]]] = [
    ("storage and plumbing", {"storage", "errors", "events"}),
    ("models", {"backbones", "losses", "video_io"}),
    ("data and the sampler", {"data", "sample"}),
    # After data: a package records what it was trained on, data never needs a package.
    ("LoRA packages", {"lora"}),
    # The training config composes the data, LoRA and sampling settings; metrics read videos.
    ("settings and metrics", {"config", "metrics"}),
    ("training", {"train", "noise_prior"}),
    # Generation resolves run folders and checkpoints (train/resolve.py); the catalog registers runs.
    ("generation and catalog", {"generate", "animate", "catalog"}),
    ("public API and recipes", {"api", "toyworld", "__init__"}),
    ("Ray layers", {"pipelines", "serve"}),
    ("command line", {"cli", "commands", "__main__"}),
]
FLOOR_OF = {unit: level for level, (_, units) in enumerate(FLOORS) for unit in units}

FORBIDDEN_IN_LIBRARY = ("ray", "fastapi", "starlette")

# Calls that publish or hash files; only storage.py may make them. (file, call) -> why it is elsewhere.
PRIMITIVES = {"os.replace", "os.rename", ".rename", "tempfile.mkdtemp", "tempfile.mkstemp", "hashlib.sha256"}
ALLOWED_PRIMITIVES = {
    ("motiondirector/catalog/store.py", "os.rename"):
        "uncommits an entry by renaming it to the trash name `removal_leftovers` looks for (a removal, "
        "not a publish)",
    ("motiondirector/catalog/index.py", "hashlib.sha256"): "digest of a JSON document in memory, not a file",
    ("motiondirector/backbones/base.py", "hashlib.sha256"): "fingerprint of a model config in memory, not a file",
    ("motiondirector/data/records.py", "hashlib.sha256"): "fingerprint of record fields in memory, not a file",
    ("pipelines/batch_spec.py", "hashlib.sha256"): "a job's idempotency key: digest of its identity document in memory",
    ("pipelines/train_batch.py", "hashlib.sha256"): "digest of LoRA weights in memory (ranks compare them)",
    ("pipelines/train_batch.py", "tempfile.mkdtemp"): "a private scratch folder per job attempt, never published",
}


def _python_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (REPO / folder).rglob("*.py"))


def _unit(module: str) -> str | None:
    """'motiondirector.data.cache' -> 'data'; 'pipelines.ingest' -> 'pipelines'; other packages -> None."""
    parts = module.split(".")
    if parts[0] in ("pipelines", "serve"):
        return parts[0]
    if parts[0] != "motiondirector":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file; relative imports made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from motiondirector import storage` names a unit too
            found += [(node.lineno, f"{module}.{alias.name}" if module == "motiondirector" else module)
                      for alias in node.names]
    return found


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and f"{func.value.id}.{func.attr}" in PRIMITIVES:
            return f"{func.value.id}.{func.attr}"
        if f".{func.attr}" in PRIMITIVES:
            return f".{func.attr}"
    return None


def test_every_unit_has_a_floor():
    units = {_unit(_module_name(path)) for path in _python_files()}
    unplaced = sorted(unit for unit in units if unit not in FLOOR_OF)
    assert not unplaced, f"put these in FLOORS of tests/test_floors.py: {unplaced}"


def test_no_upward_imports():
    upward = []
    for path in _python_files():
        source = _unit(_module_name(path))
        for line, module in _imports(path):
            target = _unit(module)
            if target is not None and target in FLOOR_OF and FLOOR_OF[target] > FLOOR_OF[source]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {module} "
                              f"({FLOORS[FLOOR_OF[source]][0]} -> {FLOORS[FLOOR_OF[target]][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_library_imports_no_ray_or_web_framework():
    found = [f"{path.relative_to(REPO)}:{line} imports {module}"
             for path in _python_files() if _unit(_module_name(path)) not in ("pipelines", "serve")
             for line, module in _imports(path) if module.split(".")[0] in FORBIDDEN_IN_LIBRARY]
    assert not found, "\n".join(found)


def test_storage_primitives_live_in_storage_only():
    found = []
    for path in _python_files():
        relative = path.relative_to(REPO).as_posix()
        if relative == "motiondirector/storage.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = _call_name(node) if isinstance(node, ast.Call) else None
            if name and (relative, name) not in ALLOWED_PRIMITIVES:
                found.append(f"{relative}:{node.lineno} calls {name}(...): use motiondirector/storage.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from motiondirector.train.layout import RunLayout\n", "upward"),
    ("def f():\n    from motiondirector.generate import generate\n", "upward"),
    ("from motiondirector.storage import atomic_write\n", None),
    ("import ray\n", "ray"),
    ("import os\nos.replace('a', 'b')\n", "os.replace"),
    ("from pathlib import Path\nPath('a').rename('b')\n", ".rename"),
])
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, source, expected):
    """The checks above fail on a planted violation in a floor-2 module (data/)."""
    fake_repo = tmp_path
    (fake_repo / "motiondirector" / "data").mkdir(parents=True)
    (fake_repo / "motiondirector" / "data" / "planted.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    checks = [test_no_upward_imports, test_library_imports_no_ray_or_web_framework,
              test_storage_primitives_live_in_storage_only]
    failing = {"upward": test_no_upward_imports, "ray": test_library_imports_no_ray_or_web_framework,
               "os.replace": test_storage_primitives_live_in_storage_only,
               ".rename": test_storage_primitives_live_in_storage_only}.get(expected)
    for check in checks:
        if check is failing:
            with pytest.raises(AssertionError, match="planted.py"):
                check()
        else:
            check()


# The Ray layers and the command line call the library through its public API only (docs/api.md).
# The toy world is a recipe on the API's floor that its own commands (toyworld, demo) run.
CALLERS = ("pipelines", "serve", "commands", "cli")
CALLABLE_UNITS = {"api", "commands", "toyworld"}


def test_callers_use_the_public_api_only():
    found = [f"{path.relative_to(REPO)}:{line} imports {module}: import it from motiondirector.api"
             for path in _python_files() if _unit(_module_name(path)) in CALLERS
             for line, module in _imports(path)
             if module.startswith("motiondirector") and _unit(module) not in CALLABLE_UNITS]
    assert not found, "\n".join(found)
