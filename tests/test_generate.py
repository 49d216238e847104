"""Generation: composition of packages at their scales, mix of videos, noise prior, outputs, replay, CLI errors."""

from __future__ import annotations

import json
import math

import torch
from test_package import random_lora_state, write_random_package, write_run
from typer.testing import CliRunner

from motiondirector import noise_prior
from motiondirector.cli import app
from motiondirector.commands.common import ExitCode
from motiondirector.generate import (
    GenerationParams,
    LoraChoice,
    composed,
    generate,
    save_video,
)
from motiondirector.lora.inject import adapter_names, lora_layers
from motiondirector.lora.package import read_manifest, write_package
from motiondirector.noise_prior import initial_noise

FAST = ["--steps", "2", "--frames", "4", "--size", "32x32", "--device", "cpu"]


def said(result) -> str:
    """The command's messages with rich's line wrapping undone."""
    return " ".join(result.output.split())


def fast_params(base, **overrides) -> GenerationParams:
    values = dict(base=str(base), prompts=["a red car"], steps=2, frames=4, height=32, width=32, seed=7)
    return GenerationParams(**(values | overrides))


def _linear_output(unet, name, x):
    return dict(unet.named_modules())[name](x)


def test_each_package_is_its_own_adapter_at_its_scale(tiny_backbone, tmp_path):
    unet = tiny_backbone.unet
    motion_a = write_random_package(tiny_backbone, tmp_path / "a", "temporal", seed=1)
    motion_b = write_random_package(tiny_backbone, tmp_path / "b", "temporal", seed=2)
    appearance = write_random_package(tiny_backbone, tmp_path / "c", "spatial", seed=3)
    temporal_module = tiny_backbone.temporal_lora_targets()[0]
    spatial_module = tiny_backbone.spatial_lora_targets()[0]
    modules = dict(unet.named_modules())
    x_t = torch.randn(3, modules[temporal_module].in_features)
    x_s = torch.randn(3, modules[spatial_module].in_features)
    base_t, base_s = _linear_output(unet, temporal_module, x_t), _linear_output(unet, spatial_module, x_s)

    def delta(folder, seed, module, x):  # B·A·x of the weights write_random_package drew with `seed`
        state = random_lora_state(unet, read_manifest(folder).targets, 4, seed)
        return x @ state[f"{module}.lora_A.weight"].T @ state[f"{module}.lora_B.weight"].T

    choices = [("motion", LoraChoice(reference=str(motion_a), scale=0.5)),
               ("motion", LoraChoice(reference=str(motion_b), scale=2.0)),
               ("appearance", LoraChoice(reference=str(appearance), scale=1.5))]
    expected_t = (base_t + 0.5 * delta(motion_a, 1, temporal_module, x_t)
                  + 2.0 * delta(motion_b, 2, temporal_module, x_t))
    expected_s = base_s + 1.5 * delta(appearance, 3, spatial_module, x_s)
    for fuse in (False, True):
        with torch.no_grad(), composed(tiny_backbone, choices, fuse=fuse) as applied:
            assert [lora.name for lora in applied] == ["motion_0", "motion_1", "appearance_0"]
            assert bool(list(lora_layers(unet))) is not fuse  # fused: plain Linears, no LoRA dispatch
            torch.testing.assert_close(_linear_output(unet, temporal_module, x_t), expected_t, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(_linear_output(unet, spatial_module, x_s), expected_s, atol=1e-5, rtol=1e-5)
        # The backbone is handed back as it was found.
        assert adapter_names(unet) == set()
        with torch.no_grad():
            torch.testing.assert_close(_linear_output(unet, temporal_module, x_t), base_t, atol=1e-6, rtol=1e-6)


def test_cli_generates_outputs_and_replay_is_identical(tiny_model_dir, tiny_backbone, tmp_path):
    run = write_run(tiny_backbone, tmp_path / "run", spatial=1)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--base", str(tiny_model_dir), "--prompt", "a red car",
                                      "--prompt", "a dog!", "--motion", str(run), "--out", str(out), "--json",
                                      *FAST])
    assert result.exit_code == 0, result.output
    videos = json.loads(result.stdout)
    seed = videos[0]["seed"]
    assert [v["seed"] for v in videos] == [seed, seed + 1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{i}-{slug}-{seed + i}.{ext}" for i, slug in enumerate(["a-red-car", "a-dog"])
        for ext in ("mp4", "gif", "png", "json"))
    sidecar = json.loads((out / f"1-a-dog-{seed + 1}.json").read_text())
    assert sidecar["seed"] == seed + 1 and sidecar["params"]["prompts"] == ["a dog!"]
    assert sidecar["params"]["steps"] == 2 and sidecar["params"]["guidance"] == 12.0
    assert sidecar["params"]["motions"] == [{"reference": str((run / "temporal").resolve()), "scale": 1.0}]
    assert sidecar["params"]["appearances"] == []  # temporal-only by default, even from a dual-path run
    assert [(lora["role"], lora["kind"]) for lora in sidecar["loras"]] == [("motion", "temporal")]

    replayed = tmp_path / "replayed"
    result = CliRunner().invoke(app, ["generate", "--from", str(out / f"1-a-dog-{seed + 1}.json"),
                                      "--out", str(replayed), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for ext in ("png", "gif"):
        name = f"1-a-dog-{seed + 1}.{ext}"
        assert (replayed / name).read_bytes() == (out / name).read_bytes()


def test_mix_appearance_of_one_run_with_motion_of_another(tiny_backbone, tmp_path):
    run_a = write_run(tiny_backbone, tmp_path / "A", spatial=1, temporal=False, seed=10)
    run_b = write_run(tiny_backbone, tmp_path / "B", spatial=2, seed=20)
    motion_only = generate(fast_params("unused", motions=[LoraChoice(reference=str(run_b))]),
                           backbone=tiny_backbone)[0].frames
    muted = generate(fast_params("unused", motions=[LoraChoice(reference=str(run_b))],
                                 appearances=[LoraChoice(reference=str(run_a), scale=0.0)]),
                     backbone=tiny_backbone)[0].frames
    mixed = generate(fast_params("unused", motions=[LoraChoice(reference=str(run_b))],
                                 appearances=[LoraChoice(reference=str(run_a))]),
                     backbone=tiny_backbone)[0]
    assert torch.equal(muted, motion_only)  # γ = 0 is exactly the base weights
    assert (mixed.frames - motion_only).abs().max() > 1e-3
    sidecar = json.loads(save_video(mixed, tmp_path / "out")["json"].read_text())
    assert sidecar == {**mixed.sidecar, "files": {k: p.name for k, p in mixed.files.items()}}
    assert [(lora["role"], lora["package"]) for lora in sidecar["loras"]] == [
        ("motion", str((run_b / "temporal").resolve())), ("appearance", str((run_a / "spatial" / "0").resolve()))]


def test_wrong_kind_or_base_is_refused_with_a_clear_error(tiny_model_dir, tiny_backbone, tmp_path):
    spatial = write_random_package(tiny_backbone, tmp_path / "spatial", "spatial")
    temporal = tmp_path / "other-base"
    manifest = read_manifest(write_random_package(tiny_backbone, temporal, "temporal"))
    state = random_lora_state(tiny_backbone.unet, manifest.targets, 4, 0)
    write_package(temporal, state, manifest.model_copy(update={"base": manifest.base.model_copy(
        update={"model_id": "cerspense/zeroscope_v2_576w", "architecture": "UNet3DConditionModel@0123"})}))
    runner = CliRunner()
    base = ["generate", "--base", str(tiny_model_dir), "--prompt", "a car", "--out", str(tmp_path / "o"), *FAST]
    result = runner.invoke(app, [*base, "--motion", str(spatial)])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "is a spatial LoRA, but a temporal LoRA is needed" in said(result)
    result = runner.invoke(app, [*base, "--motion", str(temporal)])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "trained for base 'cerspense/zeroscope_v2_576w'" in said(result)
    result = runner.invoke(app, [*base, "--motion", str(spatial), "--motion-scale", "1", "--motion-scale", "2"])
    assert result.exit_code == ExitCode.BAD_INPUT and "2 --motion-scale values for 1 --motion" in said(result)
    result = runner.invoke(app, [*base, "--noise-prior", "0.5"])
    assert result.exit_code == ExitCode.BAD_INPUT and "needs a reference video" in said(result)
    assert not (tmp_path / "o").exists()


def test_noise_prior_is_cached_and_mixed_into_the_initial_noise(tiny_backbone, car_turn, tmp_path, monkeypatch):
    params = fast_params("unused", noise_prior=0.25, reference_video=str(car_turn))
    inversions = []
    real_invert = noise_prior.ddim_invert

    def counting_invert(backbone, latents, steps, **kwargs):
        inversions.append(steps)
        return real_invert(backbone, latents, steps=steps, **kwargs)

    assert noise_prior.NOISE_PRIOR_INVERSION_STEPS == 50  # the method's; fewer here to keep the test fast
    monkeypatch.setattr(noise_prior, "NOISE_PRIOR_INVERSION_STEPS", 4)
    monkeypatch.setattr(noise_prior, "ddim_invert", counting_invert)
    geometry = {"frames": 4, "size": (32, 32), "fps": 8.0}
    first = noise_prior.noise_prior_latents(tiny_backbone, car_turn, **geometry, cache_dir=tmp_path / "cache")
    again = noise_prior.noise_prior_latents(tiny_backbone, car_turn, **geometry, cache_dir=tmp_path / "cache")
    assert inversions == [4]  # the second call read the cache
    assert torch.equal(first, again) and first.shape == (1, 4, 4, 16, 16)
    assert len(list((tmp_path / "cache" / "noise_prior").glob("*.safetensors"))) == 1

    settings = params.with_defaults(tiny_backbone.defaults).sampling
    noise = initial_noise(tiny_backbone, settings, seed=3)
    assert torch.equal(initial_noise(tiny_backbone, settings, seed=3, prior=first, prior_strength=1.0), first)
    torch.testing.assert_close(initial_noise(tiny_backbone, settings, seed=3, prior=first, prior_strength=0.25),
                               0.5 * first + math.sqrt(0.75) * noise)

    # A different clip length is a different prior (and cache entry).
    longer = {**geometry, "frames": 8}
    assert noise_prior.noise_prior_latents(tiny_backbone, car_turn, **longer, cache_dir=tmp_path / "cache").shape[2] == 8
    assert inversions == [4, 4]

    # generate() uses the cached prior, and the sidecar records the clip for replay.
    video = generate(params, backbone=tiny_backbone, cache_dir=tmp_path / "cache")[0]
    assert inversions == [4, 4]
    sidecar = video.sidecar["params"]
    assert (sidecar["noise_prior"], sidecar["reference_video"]) == (0.25, str(car_turn.resolve()))


def test_generate_from_a_run_trained_by_the_training_loop(tiny_backbone, tmp_path):
    from motiondirector.config import validate_config
    from motiondirector.train.loop import train
    from motiondirector.train.synthetic import synthetic_records

    config = validate_config({"base": "tiny", "device": "cpu", "steps": 2, "lora": {"rank": 4},
                              "data": {"sources": "synthetic.mp4"}, "gradient_checkpointing": False,
                              "checkpoint_every": 1, "mixed_precision": "no"}, "test config")
    run = tmp_path / "run"
    train(config, run, backbone=tiny_backbone, records=synthetic_records(tiny_backbone, videos=2))
    runner = CliRunner()
    # No --base: the packages name the model they were trained on.
    common = ["generate", "--prompt", "a car", "--seed", "1", "--json", *FAST]
    result = runner.invoke(app, [*common, "--motion", f"{run}@step-1", "--appearance", f"{run}/spatial/1",
                                 "--appearance-scale", "0.5", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(open(json.loads(result.stdout)[0]["files"]["json"]).read())
    assert [(lora["package"], lora["step"], lora["scale"]) for lora in sidecar["loras"]] == [
        (str(run / "checkpoints" / "step-1" / "temporal"), 1, 1.0), (str(run / "spatial" / "1"), 2, 0.5)]
    result = runner.invoke(app, [*common, "--appearance", str(run), "--out", str(tmp_path / "o2")])
    assert result.exit_code == ExitCode.BAD_INPUT and "has 2 spatial LoRAs" in said(result)


def test_generate_with_a_catalog_id(tiny_backbone, tmp_path):
    from motiondirector.catalog import Catalog

    entry = Catalog(str(tmp_path / "catalog")).add(write_random_package(tiny_backbone, tmp_path / "pkg", "temporal"))
    common = ["generate", "--prompt", "a car", "--catalog", str(tmp_path / "catalog"), "--json", *FAST]
    result = CliRunner().invoke(app, [*common, "--motion", entry.id, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(open(json.loads(result.stdout)[0]["files"]["json"]).read())
    assert sidecar["loras"][0]["reference"] == entry.id
    result = CliRunner().invoke(app, [*common, "--motion", "runs/misspelled", "--out", str(tmp_path / "o2")])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "runs/misspelled: not a local path, and not an entry of the catalog" in said(result)
