"""The catalog as training and generation use it: `train --catalog` registers the run's LoRAs, and a
registered id is what `generate --catalog --motion ID` resolves (the generate side is tested in
test_generate.py)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from motiondirector.catalog import Catalog
from motiondirector.lora.package import read_package
from motiondirector.train.resolve import resolve_lora

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_car_turn.yaml"


def test_train_with_catalog_registers_the_run_and_its_ids_resolve(tiny_model_dir, tmp_path, car_turn):
    from motiondirector.cli import app

    out, root = tmp_path / "run", str(tmp_path / "catalog")
    result = CliRunner().invoke(app, ["train", str(CONFIG), "--set", f"base={tiny_model_dir}", "--set", "steps=2",
                                      "--set", "validation.every=2", "--set", f"data.sources={car_turn}",
                                      "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                      "--catalog", root, "--json"])
    assert result.exit_code == 0, result.output
    registered = json.loads(result.stdout)["catalog_ids"]

    catalog = Catalog(root)
    entries = {m.id: m for m in catalog.query()}
    assert sorted(entries) == sorted(registered) and len(registered) == 2
    temporal, spatial = (entries[catalog_id] for catalog_id in registered)
    assert (temporal.kind, spatial.kind) == ("temporal", "spatial")
    assert temporal.run_id == spatial.run_id is not None
    assert temporal.captions == ["a car running on the road"] and temporal.step == 2
    assert temporal.preview == "preview.gif"
    assert temporal.name == "run-temporal" and spatial.name == "run-spatial-0"

    folder = resolve_lora(temporal.id, "temporal", catalog)
    manifest, state = read_package(folder)
    _, trained = read_package(out / "temporal")
    assert manifest.id == temporal.id and state.keys() == trained.keys()
    assert catalog.verify().ok
