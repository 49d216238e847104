"""Model-aware defaults: values a user leaves unset come from the base model (backbones/defaults.py)."""

from __future__ import annotations

import json
import shutil

import av
import pytest
import yaml
from typer.testing import CliRunner

from motiondirector.backbones import defaults_for
from motiondirector.backbones.defaults import DEFAULTS_FILE, ModelDefaultsError, model_defaults
from motiondirector.cli import app
from motiondirector.commands.common import ExitCode

TOY_NATIVE = {"frames": 8, "height": 32, "width": 32, "fps": 8.0, "steps": 20, "guidance": 6.0}


def test_toy_model_declares_its_native_settings():
    defaults = defaults_for("toy")
    assert defaults.values() == TOY_NATIVE
    assert defaults.source.endswith(DEFAULTS_FILE)


def test_known_hub_models_follow_their_model_cards_and_a_folder_file_wins(tiny_model_dir, tmp_path):
    zeroscope = model_defaults("cerspense/zeroscope_v2_576w", tiny_model_dir)
    assert (zeroscope.width, zeroscope.height, zeroscope.frames) == (576, 320, 24)
    modelscope = model_defaults("damo-vilab/text-to-video-ms-1.7b", tiny_model_dir)
    assert (modelscope.width, modelscope.height, modelscope.frames, modelscope.fps) == (256, 256, 16, 8.0)
    # An unknown folder: the UNet's native latent size × the VAE factor, and the reference's sampling.
    family = model_defaults(str(tiny_model_dir), tiny_model_dir)
    unet = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    vae = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert (family.height, family.steps, family.guidance) == (unet["sample_size"] * factor, 30, 12.0)

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps({"defaults": {**TOY_NATIVE, "frames": 5}}))
    assert model_defaults("cerspense/zeroscope_v2_576w", folder).frames == 5  # the folder's own file wins
    (folder / DEFAULTS_FILE).write_text(json.dumps({"defaults": {"frames": 5}}))
    with pytest.raises(ModelDefaultsError, match=f"{DEFAULTS_FILE}.*missing height"):
        model_defaults(str(folder), folder)


def test_bare_generate_on_toy_renders_the_models_native_clip(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--base", "toy", "--prompt",
                                      "a blue square moving right on a grey background", "--seed", "1",
                                      "--out", str(out), "--device", "cpu"])
    assert result.exit_code == ExitCode.OK, result.output
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert {k: sidecar["params"][k] for k in TOY_NATIVE} == TOY_NATIVE  # the values used are recorded
    with av.open(str(next(out.glob("*.mp4")))) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    # An explicit value still wins over the model's.
    result = CliRunner().invoke(app, ["generate", "--base", "toy", "--prompt", "a red circle", "--frames", "4",
                                      "--steps", "2", "--seed", "1", "--out", str(tmp_path / "four"), "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    sidecar = json.loads(next((tmp_path / "four").glob("*.json")).read_text())
    assert (sidecar["params"]["frames"], sidecar["params"]["steps"], sidecar["params"]["height"]) == (4, 2, 32)


def test_training_takes_data_and_validation_geometry_from_the_model(tiny_model_dir, car_turn, tmp_path):
    from motiondirector.api import train, validate_config

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    native = {"frames": 3, "height": 16, "width": 24, "fps": 4.0, "steps": 2, "guidance": 3.0}
    (folder / DEFAULTS_FILE).write_text(json.dumps({"defaults": native}))
    config = validate_config({"base": str(folder), "device": "cpu", "steps": 1, "mixed_precision": "no",
                              "gradient_checkpointing": False, "lora": {"rank": 2},
                              "validation": {"every": 1, "prompts": ["a car"]},
                              "data": {"sources": [str(car_turn)], "caption": "a car", "caption_source": "fixed"}},
                             "minimal config")
    summary = train(config, tmp_path / "run")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (written["data"]["frames"], written["data"]["size"], written["data"]["fps"]) == (3, [16, 24], 4.0)
    validation = written["validation"]
    assert (validation["steps"], validation["guidance"], validation["frames"], validation["size"]) == (
        2, 3.0, 3, [16, 24])
    with av.open(next(p for p in summary.samples if p.endswith(".mp4"))) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (16, 24, 3)
    assert written["timesteps"]["high_share"] == 0.0  # an ε-prediction base: the reference's uniform draw


def test_timestep_emphasis_defaults_to_half_on_zero_terminal_snr_bases(tiny_model_dir, tmp_path):
    from motiondirector.api import validate_config

    assert defaults_for("toy").timestep_high_share == 0.5  # the toy model is zero-SNR v-prediction
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    assert model_defaults(str(folder), folder).timestep_high_share == 0.0
    scheduler_file.write_text(json.dumps({**scheduler, "rescale_betas_zero_snr": True}))
    defaults = model_defaults(str(folder), folder)
    assert defaults.timestep_high_share == 0.5 and "timestep_high_share" not in defaults.values()

    def resolved(timesteps: dict) -> float:
        config = validate_config({"base": str(folder), "timesteps": timesteps,
                                  "data": {"sources": ["x.mp4"], "caption": "a car"}}, "config")
        return config.with_model_defaults(defaults).timesteps.high_share

    assert resolved({}) == 0.5
    assert resolved({"high_share": 0.0}) == 0.0  # an explicit value wins
