"""Image animation: a spatial LoRA trained on the image (spatial_only, shared), cached by image hash, plus a motion."""

from __future__ import annotations

import json

from test_generate import FAST
from test_package import write_random_package
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.lora.package import read_manifest


def test_animate_trains_once_then_reuses_the_cached_image_lora(tiny_backbone, reference_dir, tmp_path, monkeypatch):
    motion = write_random_package(tiny_backbone, tmp_path / "motion", "temporal", seed=1)
    image = reference_dir / "img_car" / "car.jpg"
    # No --base: the motion package names its base model.
    args = ["animate", str(image), "--motion", str(motion), "--prompt", "a red car", "--steps-train", "2",
            "--seed", "3", "--cache-dir", str(tmp_path / "cache"), "--json", *FAST]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)[0]["files"]
    sidecar = json.loads(open(files["json"]).read())
    assert [lora["role"] for lora in sidecar["loras"]] == ["motion", "appearance"]
    appearance = sidecar["loras"][1]["package"]
    assert appearance.startswith(str(tmp_path / "cache" / "animate"))
    manifest = read_manifest(appearance)
    assert (manifest.kind, manifest.mode, manifest.step, manifest.captions) == ("spatial", "spatial_only", 2,
                                                                                 ["a red car"])

    def no_training(*args, **kwargs):
        raise AssertionError("the cached image LoRA should have been reused")

    monkeypatch.setattr("motiondirector.train.loop.train", no_training)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)[0]["files"]
    assert json.loads(open(again["json"]).read())["loras"][1]["package"] == appearance
    assert open(again["png"], "rb").read() == open(files["png"], "rb").read()
