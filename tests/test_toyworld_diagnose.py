"""`toyworld diagnose` and the object-count / direction probes, at tiny settings (a random tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.commands.common import ExitCode
from motiondirector.sample import SamplingSettings
from motiondirector.toyworld.probes import (
    DIRECTIONS,
    OPPOSITE,
    follows_direction,
    object_counts,
    one_object_share,
    probe,
)
from motiondirector.toyworld.render import Scene, all_scenes, render

FAST_SAMPLING = SamplingSettings(steps=2, guidance=3.0, frames=4, height=32, width=32)


@pytest.fixture(scope="module")
def toy_like_dir(tmp_path_factory):
    """A random tiny model with the toy world's vocabulary, saved with the zero-SNR v-prediction scheduler."""
    from motiondirector.backbones.tiny import TinyModelConfig, build_components, save_model_folder
    from motiondirector.toyworld.pretrain import zero_snr_scheduler
    from motiondirector.toyworld.render import world_words

    components = build_components(TinyModelConfig(vae_channels=(8, 16, 16), words=world_words()), seed=0)
    components["scheduler"] = zero_snr_scheduler()
    return save_model_folder(components, tmp_path_factory.mktemp("toy-like"))


def test_rendered_clips_show_one_object_and_follow_their_own_direction_only():
    scenes = all_scenes()[::7]
    for index, scene in enumerate(scenes):
        clip = render(scene, seed=index)
        assert object_counts(clip.frames) == [1] * 8, scene.caption
        if scene.motion in DIRECTIONS:
            found = probe(clip.frames).trajectory
            assert follows_direction(found, clip.trajectory, scene.motion)
            opposite = render(scene.replace(motion=OPPOSITE[scene.motion]), seed=index)
            assert not follows_direction(found, opposite.trajectory, OPPOSITE[scene.motion])


def test_object_count_sees_a_second_blob_and_ignores_specks():
    clip = render(Scene("red", "square", "grey", "left"), seed=0)
    frames = clip.frames.copy()
    frames[2, 26:30, 26:30] = (230, 25, 25)  # a second 4x4 red blob, apart from the square
    frames[5, 0, 0] = (20, 200, 50)  # a one-pixel speck of another colour
    assert object_counts(frames) == [1, 1, 2, 1, 1, 1, 1, 1]
    assert one_object_share(frames) == pytest.approx(7 / 8)
    empty = np.full_like(frames, 128)
    assert one_object_share(empty) == 0.0


def test_a_still_object_follows_no_direction():
    clip = render(Scene("red", "square", "grey", "right"), seed=3)
    still = np.repeat(clip.frames[:1], 8, axis=0)
    assert not follows_direction(probe(still).trajectory, clip.trajectory, "right")
    with pytest.raises(ValueError, match="no direction"):
        follows_direction(clip.trajectory, clip.trajectory, "orbit")


def test_diagnose_runs_every_probe_and_writes_json_markdown_and_docs(toy_like_dir, tmp_path, monkeypatch):
    import motiondirector.toyworld.evaluate as evaluate

    monkeypatch.setattr(evaluate, "TOY_SAMPLING", FAST_SAMPLING)
    docs = tmp_path / "toyworld.md"
    docs.write_text("# doc\n<!-- diagnose:begin -->\nold\n<!-- diagnose:end -->\ntail\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "toyworld", "diagnose", "--base", str(toy_like_dir), "--leak-clips", "4", "--seeds", "1",
        "--steer-seeds", "2", "--steer-steps", "2", "--steps", "2", "--out", str(out), "--docs", str(docs),
        "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["scheduler"] == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                 "timestep_spacing": "trailing"}
    assert data["leak"]["timestep"] == 999 and data["leak"]["snr"] == pytest.approx(0.0, abs=1e-6)
    assert data["leak"]["keeps_clip_sample"]["n"] == 4
    assert set(data["accuracy"]["per_motion"]) == set(DIRECTIONS)
    assert data["accuracy"]["all"]["n"] == len(DIRECTIONS)
    assert data["steer"]["base"]["direction"]["n"] == 2 and data["steer"]["lora"]["direction"]["n"] == 2
    for entry in (data["leak"]["keeps_clip_sample"], data["accuracy"]["all"], data["steer"]["lora"]["one_object"]):
        assert 0.0 <= entry["share"] <= 1.0
    assert {"diagnose.json", "diagnose.md", "diagnose.png"} <= {p.name for p in out.iterdir()}
    text = docs.read_text()
    assert "\nold\n" not in text and "(a) direction leak" in text and "Command: `motiondirector toyworld diagnose" in text
    assert text.endswith("<!-- diagnose:end -->\ntail\n")


def test_diagnose_rejects_an_unknown_probe_and_a_prompt_without_direction(toy_like_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["toyworld", "diagnose", "--base", str(toy_like_dir), "--probe", "speed"])
    assert result.exit_code == ExitCode.BAD_INPUT and "--probe speed" in result.output
    result = runner.invoke(app, ["toyworld", "diagnose", "--base", str(toy_like_dir), "--probe", "steer",
                                 "--steer-prompt", "a red circle orbiting on a grey background", "--steer-steps", "1",
                                 "--steer-seeds", "1", "--steps", "1"])
    assert result.exit_code == ExitCode.BAD_INPUT and "directional motion" in result.output
