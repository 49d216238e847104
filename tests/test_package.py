"""The LoRA package format (write/read/compatibility) and LORA references (package, run, checkpoint, catalog).

`write_random_package` is also used by the generation and interop tests (imported as `test_package`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from motiondirector.lora.inject import linear_shapes
from motiondirector.lora.package import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    BaseModelRef,
    Manifest,
    PackageError,
    check_compatible,
    read_manifest,
    read_package,
    write_package,
)
from motiondirector.train.layout import TRAINING_STATE, RunLayout
from motiondirector.train.resolve import resolve_lora


def random_lora_state(unet, targets, rank, seed, up_scale=0.3):
    """PEFT-layout weights with non-zero up (B) matrices, so the adapter really changes the model."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    state = {}
    for name in targets:
        linear = modules[name]
        linear = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
        state[f"{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) / rank
        state[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * up_scale
    return state


def write_random_package(backbone, folder, kind, *, rank=4, seed=0, step=0, alpha=None) -> Path:
    targets = backbone.temporal_lora_targets() if kind == "temporal" else backbone.spatial_lora_targets()
    manifest = Manifest(kind=kind, base=BaseModelRef(model_id=backbone.model_id,
                                                     architecture=backbone.architecture_fingerprint),
                        rank=rank, alpha=alpha or rank, targets=targets, step=step)
    return write_package(folder, random_lora_state(backbone.unet, targets, rank, seed), manifest)


def write_run(backbone, root, *, spatial=1, temporal=True, checkpoints=(), seed=0) -> Path:
    """A run folder in the train/layout.py layout, with random packages."""
    layout = RunLayout(Path(root))
    for step in [*checkpoints, None]:
        target = layout if step is None else layout.checkpoint(step)
        if temporal:
            write_random_package(backbone, target.temporal, "temporal", seed=seed + (step or 0), step=step or 0)
        for k in range(spatial):
            write_random_package(backbone, target.spatial(k), "spatial", seed=seed + 100 + k, step=step or 0)
        if step is not None:
            (target.root / TRAINING_STATE).write_bytes(b"")
    return layout.root


# --- the format -----------------------------------------------------------------------------

def test_package_round_trip_and_manifest_last(tiny_backbone, tmp_path):
    folder = write_random_package(tiny_backbone, tmp_path / "pkg", "temporal", rank=4, seed=3)
    manifest, state = read_package(folder)
    expected = random_lora_state(tiny_backbone.unet, tiny_backbone.temporal_lora_targets(), 4, 3)
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert manifest.kind == "temporal" and manifest.rank == 4 and manifest.alpha == 4
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(manifest.targets)
    assert oct(os.stat(folder / MANIFEST).st_mode & 0o777) == oct(0o644)
    # Without the manifest (an interrupted write) the folder is not a package.
    (folder / MANIFEST).unlink()
    with pytest.raises(PackageError, match="not a LoRA package"):
        read_package(folder)


def test_read_package_names_the_problem(tiny_backbone, tmp_path):
    folder = write_random_package(tiny_backbone, tmp_path / "pkg", "spatial", rank=4)
    manifest = read_manifest(folder)
    state = random_lora_state(tiny_backbone.unet, manifest.targets, 2, 0)
    save_file(state, str(folder / ADAPTER_WEIGHTS))
    with pytest.raises(PackageError, match="rank 2, manifest says 4"):
        read_package(folder)
    (folder / MANIFEST).write_text('{"kind": "sideways"}')
    with pytest.raises(PackageError, match=r"manifest.json: invalid manifest \(kind"):
        read_manifest(folder)


def test_check_compatible_says_what_differs(tiny_backbone, tmp_path):
    manifest = read_manifest(write_random_package(tiny_backbone, tmp_path / "pkg", "spatial"))
    shapes = {name: (1, 1) for name in manifest.targets}
    arch = tiny_backbone.architecture_fingerprint
    check_compatible(manifest, arch, shapes, "pkg", expected_kind="spatial")
    with pytest.raises(PackageError, match="is a spatial LoRA, but a temporal LoRA is needed"):
        check_compatible(manifest, arch, shapes, "pkg", expected_kind="temporal")
    with pytest.raises(PackageError, match="but the loaded base has architecture other"):
        check_compatible(manifest, "other", shapes, "pkg")
    with pytest.raises(PackageError, match="target modules are missing"):
        check_compatible(manifest, arch, dict(list(shapes.items())[1:]), "pkg")
    real_shapes = linear_shapes(tiny_backbone.unet)
    state = random_lora_state(tiny_backbone.unet, manifest.targets, 4, 0)
    check_compatible(manifest, arch, real_shapes, "pkg", state=state)
    first = manifest.targets[0]
    state[f"{first}.lora_A.weight"] = torch.zeros(4, real_shapes[first][1] + 1)
    with pytest.raises(PackageError, match=rf"LoRA on {first} maps {real_shapes[first][1] + 1} -> "):
        check_compatible(manifest, arch, real_shapes, "pkg", state=state)


# --- references -----------------------------------------------------------------------------

def test_resolve_package_run_and_checkpoint(tiny_backbone, tmp_path):
    run = write_run(tiny_backbone, tmp_path / "run", spatial=1, checkpoints=(5, 10))
    layout = RunLayout(run)
    assert resolve_lora(run / "temporal", "temporal") == layout.temporal
    assert resolve_lora(run, "temporal") == layout.temporal
    assert resolve_lora(str(run), "spatial") == layout.spatial(0)
    assert resolve_lora(f"{run}@step-5", "temporal") == layout.checkpoint(5).temporal
    assert resolve_lora(f"{run}@step-10", "spatial") == layout.checkpoint(10).spatial(0)
    assert resolve_lora(f"{run}@step-10/spatial/0", "spatial") == layout.checkpoint(10).spatial(0)
    with pytest.raises(PackageError, match=r"no complete checkpoint step-7 \(available: step-5, step-10\)"):
        resolve_lora(f"{run}@step-7", "temporal")
    with pytest.raises(PackageError, match="RUN@step-<n>"):
        resolve_lora(f"{run}@latest", "temporal")
    with pytest.raises(PackageError, match="no such package folder, run folder or checkpoint"):
        resolve_lora(tmp_path / "nowhere", "temporal")


def test_resolve_run_with_several_or_no_spatial_loras(tiny_backbone, tmp_path):
    run = write_run(tiny_backbone, tmp_path / "multi", spatial=2)
    with pytest.raises(PackageError, match=r"has 2 spatial LoRAs .*multi/spatial/0, .*multi/spatial/1"):
        resolve_lora(run, "spatial")
    assert resolve_lora(run / "spatial" / "1", "spatial") == RunLayout(run).spatial(1)
    images_only = write_run(tiny_backbone, tmp_path / "images", spatial=1, temporal=False)
    with pytest.raises(PackageError, match="no motion"):
        resolve_lora(images_only, "temporal")


def test_resolve_uses_a_catalog_for_non_paths(tiny_backbone, tmp_path):
    package = write_random_package(tiny_backbone, tmp_path / "stored", "temporal")

    class Catalog:
        def resolve(self, entry_id):
            if entry_id != "car-turn":
                raise KeyError(entry_id)
            return str(package)

    assert resolve_lora("car-turn", "temporal", catalog=Catalog()) == package
    with pytest.raises(PackageError, match="not an entry of the catalog"):
        resolve_lora("bicycle", "temporal", catalog=Catalog())
    with pytest.raises(PackageError, match="catalog ids need a catalog"):
        resolve_lora("car-turn", "temporal")


def test_lora_info_summarizes_the_manifest(tiny_backbone, tmp_path):
    from typer.testing import CliRunner

    from motiondirector.cli import app

    folder = write_random_package(tiny_backbone, tmp_path / "pkg", "spatial", rank=4, step=150)
    result = CliRunner().invoke(app, ["lora", "info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    _, state = read_package(folder)
    assert (summary["kind"], summary["rank"], summary["step"]) == ("spatial", 4, 150)
    assert summary["parameters"] == sum(t.numel() for t in state.values()) > 0
    assert summary["modules"] == len(tiny_backbone.spatial_lora_targets())
    assert CliRunner().invoke(app, ["lora", "info", str(folder)]).exit_code == 0
    assert CliRunner().invoke(app, ["lora", "info", str(tmp_path)]).exit_code == 2
