"""motiondirector.api: every listed name resolves, and importing the module alone loads no model code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from motiondirector import api


def test_every_public_name_resolves_to_its_module():
    for name in api.__all__:
        value = getattr(api, name)
        assert value is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        api.not_a_name  # noqa: B018


def test_importing_the_api_is_cheap_and_names_load_only_their_modules():
    probe = ("import sys; from motiondirector import api; loaded = 'torch' in sys.modules; "
             "api.Catalog; print(loaded, 'diffusers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]  # the catalog needs neither torch nor diffusers


def test_every_name_callers_take_from_the_api_exists():
    """A caller's `from motiondirector.api import X` or `api.X` fails only when that code path runs."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    callers = [*root.glob("motiondirector/commands/*.py"), *root.glob("pipelines/*.py"), *root.rglob("serve/*.py"),
               *root.glob("bench/*.py")]
    missing = set()
    for path in callers:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "motiondirector.api":
                missing |= {(path.name, alias.name) for alias in node.names if alias.name not in api.__all__}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "api":
                if not node.attr.startswith("_") and node.attr not in api.__all__:
                    missing.add((path.name, node.attr))
    assert not missing, sorted(missing)
