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
