"""The dual-path loop on the tiny model: gradient routing, untouched LoRAs, precision, seeds, resume, modes."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
import yaml

from motiondirector.config import ConfigError, TrainConfig, apply_overrides, validate_config
from motiondirector.events import Progress, Recorder, TrainStep
from motiondirector.lora.inject import Router, adapter_parameters
from motiondirector.lora.package import read_package
from motiondirector.losses import spatial_loss, temporal_loss
from motiondirector.noise_prior import noise_prior_latents
from motiondirector.train.engine import flat_groups
from motiondirector.train.layout import RunLayout
from motiondirector.train.loop import RunFolderError, TrainingInterrupted, train
from motiondirector.train.plan import installed_adapters, plan_adapters
from motiondirector.train.step import clip_tensors, draw_step, step_gradients
from motiondirector.train.synthetic import synthetic_records

BASE = {"base": "tiny", "device": "cpu", "steps": 3, "lora": {"rank": 4}, "data": {"sources": "synthetic.mp4"},
        "gradient_checkpointing": False, "checkpoint_every": 0, "mixed_precision": "no", "optimizer": {"lr": 1e-3}}


def make_config(*overrides: str) -> TrainConfig:
    return validate_config(apply_overrides(BASE, overrides), "test config")


def weights(out) -> dict[str, dict[str, torch.Tensor]]:
    """All LoRA packages of a run folder: {"temporal": state, "spatial/0": state, ...}."""
    layout = RunLayout(out)
    folders = {f"spatial/{k}": layout.spatial(k) for k in layout.spatial_indices()}
    if layout.temporal.exists():
        folders["temporal"] = layout.temporal
    return {name: read_package(folder)[1] for name, folder in folders.items()}


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}: {key} differs"


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_each_path_gets_gradients_from_its_own_loss_only(tiny_backbone):
    config = make_config("lora.dropout=0")  # the passes below must repeat the step's exactly
    records = synthetic_records(tiny_backbone, videos=2)
    plan = plan_adapters(config, records, tiny_backbone)
    unet = tiny_backbone.unet
    with installed_adapters(unet, plan, config.lora.settings, seed=0):
        router, groups = Router(unet), flat_groups(plan.parameter_paths(unet))
        with torch.no_grad():  # up = 0 at init would zero every gradient of the down matrices
            for params in groups.values():
                for up in params[1::2]:
                    up.normal_(0.0, 0.1)
        draw = draw_step(torch.Generator().manual_seed(0), [(1, *r.latent_mean.shape) for r in records], 1000, 0.0)
        clip, spatial = clip_tensors(records[draw.record], tiny_backbone.device), plan.spatial_for(draw.record)
        result = step_gradients(tiny_backbone, plan, router, groups, "dual_path", clip, draw, ad_beta=1.0,
                                loss_scale=1.0, autocast=contextlib.nullcontext)
        assert set(result.grads) == {spatial, "temporal"}  # the other video's spatial LoRA gets nothing

        # The same two passes by hand, each loss differentiated with respect to both LoRAs.
        latents = (clip.mean + clip.std * draw.latent_noise) * tiny_backbone.latent_scaling_factor
        timesteps = torch.tensor([draw.timestep])
        noisy = tiny_backbone.scheduler.add_noise(latents, draw.noise, timesteps)
        frame = slice(draw.frame, draw.frame + 1)
        with router.active([spatial]), tiny_backbone.bypass_temporal():
            loss_spatial = spatial_loss(tiny_backbone.predict(noisy[:, :, frame], timesteps, clip.text),
                                        draw.noise[:, :, frame])
            spatial_on_spatial = torch.autograd.grad(loss_spatial, groups[spatial], retain_graph=True)
            spatial_on_temporal = torch.autograd.grad(loss_spatial, groups["temporal"], allow_unused=True)
        with router.active(["temporal", spatial]):
            loss_temporal = temporal_loss(tiny_backbone.predict(noisy, timesteps, clip.text), draw.noise, draw.anchor)
            temporal_on_temporal = torch.autograd.grad(loss_temporal, groups["temporal"], retain_graph=True)
            temporal_on_spatial = torch.autograd.grad(loss_temporal, groups[spatial])

    assert result.losses["loss_spatial"] == float(loss_spatial.detach())
    assert result.losses["loss_temporal"] == float(loss_temporal.detach())
    assert all(torch.equal(a, b) for a, b in zip(result.grads[spatial], spatial_on_spatial, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(result.grads["temporal"], temporal_on_temporal, strict=True))
    # The temporal loss does reach the spatial LoRA (active at scale 1): leaving it out is a real choice.
    assert sum(float(g.abs().sum()) for g in temporal_on_spatial) > 0
    # The spatial path bypasses every temporal layer: the temporal LoRA is not in its graph.
    assert all(g is None or not g.any() for g in spatial_on_temporal)


def test_gradient_checkpointing_gives_the_same_loras(tiny_backbone, tmp_path):
    """Recomputation must see each path's routing and bypass (tolerance: 1e-6 absolute, in practice exact)."""
    records = synthetic_records(tiny_backbone, videos=2)
    train(make_config(), tmp_path / "plain", backbone=tiny_backbone, records=records)
    train(make_config("gradient_checkpointing=true"), tmp_path / "checkpointed", backbone=tiny_backbone,
          records=records)
    plain, checkpointed = weights(tmp_path / "plain"), weights(tmp_path / "checkpointed")
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        for key, tensor in plain[name].items():
            torch.testing.assert_close(checkpointed[name][key], tensor, rtol=0, atol=1e-6)


def test_a_lora_without_a_loss_this_step_does_not_move(tiny_backbone, tmp_path):
    # Weight decay and momentum would move a stepped LoRA even with a zero gradient.
    config = make_config("steps=8", "spatial_skip_probability=0.5", "optimizer.weight_decay=0.1", "seed=3")
    records = synthetic_records(tiny_backbone, videos=2)
    names = ["spatial_0", "spatial_1", "temporal"]
    history = []

    def snapshot(event):
        if isinstance(event, TrainStep):
            current = {n: [p.detach().clone() for p in adapter_parameters(tiny_backbone.unet, n)] for n in names}
            history.append((event.metrics, current))

    train(config, tmp_path / "run", backbone=tiny_backbone, records=records, observers=[snapshot])
    seen_updated, cases = set(), {"skip": 0, "other_video": 0}
    for (_, before), (entry, after) in itertools.pairwise(history):
        for name in names:
            moved = any(not torch.equal(a, b) for a, b in zip(before[name], after[name], strict=True))
            assert moved == (name in entry["updated"]), (entry["step"], name)
        spatial_updates = [n for n in entry["updated"] if n.startswith("spatial")]
        if entry["skip_spatial"]:
            assert not spatial_updates and "loss_spatial" not in entry
            cases["skip"] += 1
        elif any(n in seen_updated and n not in entry["updated"] for n in ("spatial_0", "spatial_1")):
            cases["other_video"] += 1  # an adapter with optimizer state sat this step out
        seen_updated |= set(entry["updated"])
    assert cases["skip"] and cases["other_video"], cases  # both situations were exercised


def test_same_seed_gives_bit_identical_loras_and_another_seed_does_not(tiny_backbone, tmp_path):
    records = synthetic_records(tiny_backbone, videos=2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(make_config(f"seed={seed}"), tmp_path / name, backbone=tiny_backbone, records=records)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    a, c = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert not torch.equal(a["temporal"][next(iter(a["temporal"]))], c["temporal"][next(iter(c["temporal"]))])


def test_signal_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_backbone, tmp_path):
    config = make_config("steps=5", "checkpoint_every=4")
    records = synthetic_records(tiny_backbone, videos=2)
    train(config, tmp_path / "straight", backbone=tiny_backbone, records=records)

    def interrupt_at_step_2(event):
        if isinstance(event, TrainStep) and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the loop: finish the step, checkpoint, stop

    out = tmp_path / "interrupted"
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, out, backbone=tiny_backbone, records=records, observers=[interrupt_at_step_2])
    assert stopped.value.step == 2 and stopped.value.checkpoint == out / "checkpoints" / "step-2"
    assert RunLayout(out).checkpoint_steps() == [2] and not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored

    summary = train(config, out, resume=True, backbone=tiny_backbone, records=records)
    assert summary.resumed_from == 2 and summary.checkpoints == [2, 4, 5]
    assert_same_weights(weights(tmp_path / "straight"), weights(out))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    straight = [{k: v for k, v in m.items() if k != "seconds"} for m in metrics(tmp_path / "straight")]
    assert straight == [{k: v for k, v in m.items() if k != "seconds"} for m in metrics(out)]


def test_autocast_loras_are_close_to_fp32_loras(tiny_backbone, tmp_path):
    """Tolerance: after 3 steps, the learned up-matrices (zero at init, so pure updates) point the same way
    (cosine ≥ 0.97) and all weights agree within 1% in norm; another seed gives cosine ≈ 0."""
    records = synthetic_records(tiny_backbone)
    runs = {}
    for name, overrides in (("fp32", []), ("bf16", ["mixed_precision=bf16"]), ("fp16", ["mixed_precision=fp16"]),
                            ("other_seed", ["seed=9"])):
        train(make_config("lora.dropout=0", *overrides), tmp_path / name, backbone=tiny_backbone, records=records)
        runs[name] = weights(tmp_path / name)

    def flat(run, part):
        return torch.cat([t.flatten() for name in sorted(run) for key, t in sorted(run[name].items()) if part in key])

    def cosine(a, b):
        return float(F.cosine_similarity(flat(a, "lora_B"), flat(b, "lora_B"), dim=0))

    reference = flat(runs["fp32"], "lora_")
    for precision in ("bf16", "fp16"):
        assert cosine(runs["fp32"], runs[precision]) >= 0.97, precision
        assert float((flat(runs[precision], "lora_") - reference).norm() / reference.norm()) < 0.01, precision
    assert cosine(runs["fp32"], runs["other_seed"]) < 0.5


def test_routing_plans(tiny_backbone):
    videos = synthetic_records(tiny_backbone, videos=2, clips_per_video=2)
    plan = plan_adapters(make_config(), videos, tiny_backbone)
    assert plan.routing == "per_video" and plan.spatial_of_record == (0, 0, 1, 1)
    assert [a.records for a in plan.spatial] == [(0, 1), (2, 3)] and plan.temporal.records == (0, 1, 2, 3)
    assert plan_adapters(make_config("spatial_lora=per_clip"), videos, tiny_backbone).spatial_of_record == (0, 1, 2, 3)
    assert plan_adapters(make_config("spatial_lora=shared"), videos, tiny_backbone).spatial_of_record == (0, 0, 0, 0)
    images = [r for r in synthetic_records(tiny_backbone, videos=3)]
    for record in images:
        record.is_image = True
    assert plan_adapters(make_config(), images, tiny_backbone).routing == "shared"
    spatial_only = plan_adapters(make_config("mode=spatial_only"), images, tiny_backbone)
    assert spatial_only.temporal is None and [a.name for a in spatial_only.adapters] == ["spatial_0"]
    assert len(plan.spatial[0].targets) == len(tiny_backbone.spatial_lora_targets())


@pytest.mark.parametrize(("mode", "packages", "updated", "logged"), [
    ("coupled", {"temporal", "spatial/0"}, ["spatial_0", "temporal"], {"loss_temporal", "loss_org"}),
    ("spatial_only", {"spatial/0", "spatial/1"}, None, {"loss_spatial"}),
    ("dual_path_no_ad", {"temporal", "spatial/0", "spatial/1"}, None, {"loss_temporal", "loss_org"}),
])
def test_modes(tiny_backbone, tmp_path, mode, packages, updated, logged):
    records = synthetic_records(tiny_backbone, videos=2)
    summary = train(make_config(f"mode={mode}", "steps=2", "spatial_skip_probability=1"), tmp_path / mode,
                    backbone=tiny_backbone, records=records)
    assert set(weights(tmp_path / mode)) == packages
    assert summary.mode == mode
    for entry in metrics(tmp_path / mode):
        assert {k for k in entry if k.startswith("loss_")} == logged
        if updated is not None:
            assert entry["updated"] == updated
        elif mode == "spatial_only":  # no skipping without a temporal path; the clip's own video's LoRA moves
            assert entry["updated"] == [f"spatial_{entry['spatial_lora']}"]
        else:  # skip probability 1: the spatial path never runs, so only the temporal LoRA moves
            assert entry["updated"] == ["temporal"] and entry["loss_temporal"] == entry["loss_org"]
    for name in packages:
        assert read_package(tmp_path / mode / name)[0].mode == mode


def test_record_draw_follows_sampling_weights():
    # An image with hflip p becomes two weighted records (original 1-p, mirrored p).
    shapes = [(1, 4, 2, 4, 4)] * 3
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64)
    drawn = [draw_step(generator, shapes, 1000, 0.0, weights).record for _ in range(400)]
    assert 2 not in drawn
    assert 0.65 < drawn.count(0) / len(drawn) < 0.85
    uniform = {draw_step(generator, shapes, 1000, 0.0).record for _ in range(100)}
    assert uniform == {0, 1, 2}


def test_the_mode_defaults_to_the_data_kind_and_an_explicit_mode_wins(tiny_backbone, tmp_path):
    """method.md: temporal training is off for images; unset, the mode follows the data."""
    videos = synthetic_records(tiny_backbone, videos=2)
    images = [dataclasses.replace(r, is_image=True) for r in videos]
    assert make_config().mode is None

    summary = train(make_config("steps=2"), tmp_path / "images", backbone=tiny_backbone, records=images)
    assert summary.mode == "spatial_only" and summary.packages["temporal"] is None
    assert set(weights(tmp_path / "images")) == {"spatial/0"}  # shared routing for images
    assert yaml.safe_load((tmp_path / "images" / "config.yaml").read_text())["mode"] == "spatial_only"
    assert read_package(tmp_path / "images" / "spatial" / "0")[0].mode == "spatial_only"

    explicit = train(make_config("steps=2", "mode=dual_path"), tmp_path / "explicit", backbone=tiny_backbone,
                     records=images)
    assert explicit.mode == "dual_path" and set(weights(tmp_path / "explicit")) == {"temporal", "spatial/0"}

    assert train(make_config("steps=1"), tmp_path / "videos", backbone=tiny_backbone, records=videos).mode == "dual_path"

    # Resuming with the mode still unset finds the mode the folder trained in; changing it is refused.
    resumed = train(make_config("steps=3"), tmp_path / "images", resume=True, backbone=tiny_backbone, records=images)
    assert (resumed.mode, resumed.resumed_from) == ("spatial_only", 2)
    with pytest.raises(RunFolderError, match="changed: mode"):
        train(make_config("steps=4", "mode=dual_path"), tmp_path / "images", resume=True, backbone=tiny_backbone,
              records=images)
    with pytest.raises(RunFolderError, match="changed: mode"):
        train(make_config("steps=4"), tmp_path / "images", resume=True, backbone=tiny_backbone, records=videos)


def test_validation_mixes_the_noise_prior_of_the_first_training_video(tiny_backbone, car_turn, tmp_path, monkeypatch):
    """validation.noise_prior p: prompt i starts from sqrt(p)·z_inv + sqrt(1−p)·ε(seed + i), z_inv the
    (cached) DDIM inversion of the first training video, as generate's --noise-prior."""
    from motiondirector import noise_prior
    from motiondirector.train import loop

    monkeypatch.setattr(noise_prior, "NOISE_PRIOR_INVERSION_STEPS", 4)  # the method's 50, fewer for speed
    started = []
    monkeypatch.setattr(loop, "sample_videos", lambda backbone, prompts, settings, initial_noise: (
        started.append(initial_noise.clone()), torch.zeros(1, settings.frames, 32, 32, 3))[1])
    records = [dataclasses.replace(r, video_path=str(car_turn)) for r in synthetic_records(tiny_backbone, videos=2)]
    validation = ("steps=1", "validation.every=1", "validation.steps=2", "validation.frames=4",
                  "validation.size=[32, 32]", "validation.fps=8", "validation.seed=5", f"cache_dir={tmp_path / 'cache'}")
    recorder = Recorder()
    train(make_config(*validation, "validation.noise_prior=0.5"), tmp_path / "prior", backbone=tiny_backbone,
          records=records, observers=[recorder])
    inversion = [(e.phase, e.done, e.total, e.label) for e in recorder.of(Progress)]
    assert inversion == [("noise_prior", done, 4, str(car_turn)) for done in range(1, 5)]
    train(make_config(*validation), tmp_path / "plain", backbone=tiny_backbone, records=records)
    with_prior, plain = started
    z_inv = noise_prior_latents(  # read back from the cache the run filled
        tiny_backbone, car_turn, frames=4, size=(32, 32), fps=8.0, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "noise_prior").glob("*.safetensors"))) == 1
    torch.testing.assert_close(with_prior, math.sqrt(0.5) * z_inv + math.sqrt(0.5) * plain)
    assert not torch.allclose(with_prior, plain)

    # An explicit reference wins; a reference without a prior, or images without one, are refused.
    with pytest.raises(ConfigError, match="validation.noise_prior > 0"):
        make_config(f"validation.reference={car_turn}")
    images = [dataclasses.replace(r, is_image=True) for r in records]
    with pytest.raises(ValueError, match="set validation.reference"):
        train(make_config(*validation, "validation.noise_prior=0.5"), tmp_path / "images", backbone=tiny_backbone,
              records=images)
    train(make_config(*validation, "validation.noise_prior=0.5", f"validation.reference={car_turn}"),
          tmp_path / "images-ref", backbone=tiny_backbone, records=images)
    torch.testing.assert_close(started[-1], with_prior)  # the same clip, geometry and seed: the same prior
