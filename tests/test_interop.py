"""LoRA interop: reference-implementation files, kohya round trip, merged export read by diffusers' own pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_generate import said
from test_package import write_random_package
from torch import nn
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.commands.common import ExitCode
from motiondirector.lora.inject import activate, apply_package
from motiondirector.lora.package import read_manifest, read_package

CLASS_OF_KIND = {"spatial": "Transformer2DModel", "temporal": "TransformerTemporalModel"}
LAYERS_OF_KIND = {"spatial": ("attn1", "ff"), "temporal": ("attn1", "attn2", "ff")}


def method_order(unet, kind):
    """docs/method.md's rule, written out independently: per transformer of the kind's class in
    unet.named_modules() order, its Linears (under attn1/attn2/ff) in its own named_modules() order."""
    order = []
    for name, module in unet.named_modules():
        if type(module).__name__ == CLASS_OF_KIND[kind]:
            order += [f"{name}.{inner}" for inner, child in module.named_modules()
                      if isinstance(child, nn.Linear) and set(inner.split(".")) & set(LAYERS_OF_KIND[kind])]
    return order


def write_reference_file(unet, kind, path, clips=1, rank=3, seed=0):
    """A reference-implementation file: per module, [up_0, down_0, ..., up_N-1, down_N-1]."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    tensors, known = [], {}
    for name in method_order(unet, kind):
        for k in range(clips):
            up = torch.randn(modules[name].out_features, rank, generator=generator)
            down = torch.randn(rank, modules[name].in_features, generator=generator)
            tensors += [up, down]
            known[(name, k)] = (up, down)
    torch.save(tensors, path)
    return known


def assert_reproduces(backbone, package, known, clip):
    """With the imported package at scale 1, every target Linear computes W0 x + b + up·down·x."""
    unet = backbone.unet
    modules = dict(unet.named_modules())
    originals = {name: (modules[name].weight.clone(), modules[name].bias) for name, _ in known}
    apply_package(unet, backbone.architecture_fingerprint, package, f"check_{clip}")
    activate(unet, [f"check_{clip}"])
    checked = 0
    with torch.no_grad():
        for (name, k), (up, down) in known.items():
            if k != clip:
                continue
            weight, bias = originals[name]
            x = torch.randn(2, weight.shape[1])
            expected = x @ (weight + up @ down).T + (0 if bias is None else bias)
            torch.testing.assert_close(dict(unet.named_modules())[name](x), expected, atol=1e-4, rtol=1e-4)
            checked += 1
    activate(unet, [])
    assert checked == len(read_manifest(package).targets) > 0


@pytest.mark.parametrize("kind", ["temporal", "spatial"])
def test_import_reference_file_with_one_lora(kind, tiny_model_dir, tiny_backbone, tmp_path):
    known = write_reference_file(tiny_backbone.unet, kind, tmp_path / "100_unet.pt", clips=1)
    result = CliRunner().invoke(app, ["lora", "import-reference", str(tmp_path / "100_unet.pt"), "--kind", kind,
                                      "--base", str(tiny_model_dir), "--out", str(tmp_path / "pkg"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"written": [str(tmp_path / "pkg")]}
    manifest = read_manifest(tmp_path / "pkg")
    assert (manifest.kind, manifest.rank, manifest.alpha) == (kind, 3, 3.0)
    assert manifest.targets == method_order(tiny_backbone.unet, kind)
    assert manifest.training_config["imported_from"]["format"] == "motiondirector-reference"
    assert_reproduces(tiny_backbone, tmp_path / "pkg", known, clip=0)


def test_import_reference_spatial_file_with_two_clips(tiny_model_dir, tiny_backbone, tmp_path):
    known = write_reference_file(tiny_backbone.unet, "spatial", tmp_path / "s.pt", clips=2, seed=5)
    runner = CliRunner()
    args = ["lora", "import-reference", str(tmp_path / "s.pt"), "--kind", "spatial", "--base", str(tiny_model_dir)]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "all")]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["0", "1"]
    assert_reproduces(tiny_backbone, tmp_path / "all" / "0", known, clip=0)
    assert_reproduces(tiny_backbone, tmp_path / "all" / "1", known, clip=1)
    assert runner.invoke(app, [*args, "--index", "1", "--out", str(tmp_path / "one")]).exit_code == 0
    one, second = read_package(tmp_path / "one")[1], read_package(tmp_path / "all" / "1")[1]
    assert all(torch.equal(one[key], second[key]) for key in second)
    result = runner.invoke(app, [*args, "--index", "2", "--out", str(tmp_path / "none")])
    assert result.exit_code == ExitCode.BAD_INPUT and "holds 2 spatial LoRA(s) (0..1)" in said(result)


def test_import_reference_rejects_bad_files(tiny_model_dir, tiny_backbone, tmp_path):
    unet = tiny_backbone.unet
    runner = CliRunner()

    def run(path, kind="temporal"):
        result = runner.invoke(app, ["lora", "import-reference", str(path), "--kind", kind,
                                     "--base", str(tiny_model_dir), "--out", str(tmp_path / "out")])
        assert result.exit_code == ExitCode.BAD_INPUT
        return said(result)

    write_reference_file(unet, "temporal", tmp_path / "t.pt")
    tensors = torch.load(tmp_path / "t.pt", weights_only=True)
    count = len(method_order(unet, "temporal"))
    torch.save(tensors[:-1], tmp_path / "short.pt")
    assert f"holds {2 * count - 1} tensors" in run(tmp_path / "short.pt")
    torch.save([tensors[1], tensors[0], *tensors[2:]], tmp_path / "swapped.pt")
    assert "tensors 0 and 1" in run(tmp_path / "swapped.pt")
    torch.save(tensors + tensors, tmp_path / "double.pt")
    assert "a temporal file holds exactly one" in run(tmp_path / "double.pt")
    torch.save({"up": tensors[0]}, tmp_path / "dict.pt")
    assert "expected a list of tensors" in run(tmp_path / "dict.pt")
    torch.save([nn.Linear(2, 2)], tmp_path / "pickle.pt")  # arbitrary objects are never unpickled
    assert "torch.load(weights_only=True)" in run(tmp_path / "pickle.pt")
    assert "a spatial file for this base" in run(tmp_path / "t.pt", kind="spatial")  # wrong --kind


def test_kohya_round_trip_is_identical(tiny_model_dir, tiny_backbone, tmp_path):
    package = write_random_package(tiny_backbone, tmp_path / "pkg", "temporal", rank=4, alpha=2.0, seed=9)
    runner = CliRunner()
    result = runner.invoke(app, ["lora", "export", str(package), "--format", "kohya",
                                 "--out", str(tmp_path / "k.safetensors")])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "k.safetensors"))
    first = read_manifest(package).targets[0]
    prefix = "lora_unet_" + first.replace(".", "_")
    assert tensors[f"{prefix}.lora_down.weight"].shape[0] == 4 and float(tensors[f"{prefix}.alpha"]) == 2.0
    assert len(tensors) == 3 * len(read_manifest(package).targets)

    result = runner.invoke(app, ["lora", "import", str(tmp_path / "k.safetensors"), "--kind", "temporal",
                                 "--base", str(tiny_model_dir), "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    (before_manifest, before), (after_manifest, after) = read_package(package), read_package(tmp_path / "back")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert (after_manifest.kind, after_manifest.rank, after_manifest.alpha) == ("temporal", 4, 2.0)
    assert sorted(after_manifest.targets) == sorted(before_manifest.targets)

    result = runner.invoke(app, ["lora", "import", str(tmp_path / "k.safetensors"), "--kind", "spatial",
                                 "--base", str(tiny_model_dir), "--out", str(tmp_path / "wrong")])
    assert result.exit_code == ExitCode.BAD_INPUT and "exported as a temporal LoRA, not spatial" in said(result)


def test_merged_export_runs_in_diffusers_pipeline_like_the_injected_lora(tiny_model_dir, tiny_backbone, tmp_path):
    from diffusers import TextToVideoSDPipeline

    package = write_random_package(tiny_backbone, tmp_path / "pkg", "temporal", rank=4, seed=4)
    result = CliRunner().invoke(app, ["lora", "export", str(package), "--format", "merged", "--scale", "0.7",
                                      "--base", str(tiny_model_dir), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "merged" / "motiondirector_export.json").read_text())
    assert record["fused"][0]["scale"] == 0.7

    def frames(pipe):
        return pipe("a red car", num_inference_steps=2, num_frames=4, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    fused = frames(TextToVideoSDPipeline.from_pretrained(tmp_path / "merged"))
    pipe = TextToVideoSDPipeline.from_pretrained(tiny_model_dir)
    base = frames(pipe)
    apply_package(pipe.unet, tiny_backbone.architecture_fingerprint, package, "motion_0", scale=0.7)
    activate(pipe.unet, ["motion_0"])
    injected = frames(pipe)
    assert (injected - base).abs().max() > 1e-2  # the LoRA matters...
    torch.testing.assert_close(fused, injected, atol=1e-4, rtol=1e-4)  # ...and fusing it changes nothing
