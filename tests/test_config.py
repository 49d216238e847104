"""Training config: the shipped configs, strict keys, --set overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from motiondirector.backbones.defaults import family_defaults
from motiondirector.config import ConfigError, TrainConfig, apply_overrides, load_config, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "base: toy\ndata:\n  sources: clip.mp4\n  caption: a car\n"


def test_reference_configs_load_with_the_papers_settings(reference_dir):
    car = load_config(CONFIGS / "car_turn.yaml")
    assert (car.steps, car.optimizer.weight_decay, car.checkpoint_every) == (150, 1e-2, 50)
    assert (car.optimizer.lr, car.optimizer.betas, car.optimizer.eps) == (5e-4, (0.9, 0.999), 1e-8)
    assert (car.lora.rank, car.lora.alpha, car.lora.dropout, car.spatial_skip_probability) == (32, None, 0.1, 0.2)
    assert car.data.caption == "A car running on the road" and car.data.size == (384, 384)
    assert Path(car.data.sources[0]).resolve() == (reference_dir / "car_turn" / "car-turn.mp4").resolve()

    bicycle = load_config(CONFIGS / "bicycle.yaml")
    assert (bicycle.steps, bicycle.optimizer.weight_decay, bicycle.spatial_lora) == (400, 1e-4, "per_video")
    assert Path(bicycle.data.sources[0]).resolve() == (reference_dir / "bicycle").resolve()

    tiny = load_config(CONFIGS / "tiny_car_turn.yaml", ["base=/models/tiny"])
    assert (tiny.base, tiny.data.frames, tiny.data.size, tiny.lora.rank) == ("/models/tiny", 4, (32, 32), 4)


def test_defaults_follow_method_md(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.mixed_precision == "auto" and config.gradient_checkpointing
    # unset, the mode follows the data (method.md: temporal training is off for images)
    assert config.mode is None and config.mode_for(images=False) == "dual_path"
    assert config.mode_for(images=True) == "spatial_only"
    assert config.with_data_kind(images=True).mode == "spatial_only"
    explicit = load_config(write(tmp_path, MINIMAL), ["mode=coupled"])
    assert explicit.mode_for(images=True) == "coupled" and explicit.with_data_kind(images=True).mode == "coupled"
    assert config.ad_beta == 1.0 and config.engine.kind == "torch" and config.engine.zero_stage == 2
    # Sampling, frames and size are the base model's until set (backbones/defaults.py); a model folder
    # without its own defaults gets the family's, which are the reference's 30 steps at guidance 12.
    assert (config.validation.steps, config.validation.guidance, config.data.frames, config.data.size) == (
        None, None, None, None)
    resolved = config.with_model_defaults(family_defaults({"sample_size": 48}, {"block_out_channels": [1] * 4}))
    assert (resolved.validation.sampling.steps, resolved.validation.sampling.guidance) == (30, 12.0)
    assert (resolved.data.frames, resolved.data.size, resolved.data.fps) == (16, (384, 384), 8.0)
    # relative sources are relative to the config file
    assert config.data.sources == [str(tmp_path / "clip.mp4")]


def test_routing_defaults_by_data_kind(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.routing(images=False) == "per_video"
    assert config.routing(images=True) == "shared"
    assert load_config(write(tmp_path, MINIMAL + "spatial_lora: per_clip\n")).routing(images=False) == "per_clip"
    assert load_config(write(tmp_path, MINIMAL + "mode: coupled\n")).routing(images=False) == "shared"


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL + "optimizer:\n  lrr: 0.1\nstep: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(str(path))
    assert "optimizer.lrr: unknown key (did you mean optimizer.lr?)" in message
    assert "step: unknown key (did you mean steps?)" in message


def test_unknown_key_in_the_data_section(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.fsp: unknown key \(did you mean data\.fps\?\)"):
        load_config(write(tmp_path, MINIMAL + "  fsp: 8\n"))


def test_type_errors_and_missing_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"steps: Input should be a valid integer"):
        load_config(write(tmp_path, MINIMAL), ["steps=many"])
    with pytest.raises(ConfigError, match=r"base: required key is missing"):
        load_config(write(tmp_path, "data:\n  sources: a.mp4\n"))
    with pytest.raises(ConfigError, match=r"mode: Input should be 'dual_path'"):
        load_config(write(tmp_path, MINIMAL + "mode: dualpath\n"))
    with pytest.raises(ConfigError, match=r"spatial_lora must be 'shared' or 'auto', not 'per_video'"):
        load_config(write(tmp_path, MINIMAL + "mode: coupled\nspatial_lora: per_video\n"))


def test_overrides_are_yaml_values_at_dotted_keys(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), [
        "optimizer.lr=1e-4", "lora.rank=8", "validation.prompts=[a dog, a cat]", "data.size=[32, 48]",
        "mixed_precision=bf16", "engine.kind=deepspeed"])
    assert config.optimizer.lr == 1e-4 and config.lora.rank == 8
    assert config.validation.prompts == ["a dog", "a cat"] and config.data.size == (32, 48)
    assert config.mixed_precision == "bf16" and config.engine.kind == "deepspeed"


def test_override_sources_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "tiny_car_turn.yaml", ["base=x", "data.sources=videos/a.mp4"])
    assert config.data.sources == [str(tmp_path / "videos" / "a.mp4")]


def test_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match=r"--set steps\.x: steps is a value, not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])
    with pytest.raises(ConfigError, match=r"with --set lora\.rnk=4.*lora\.rnk: unknown key \(did you mean lora\.rank"):
        load_config(write(tmp_path, MINIMAL), ["lora.rnk=4"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "base: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping of config keys, got list"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_yaml_round_trip(tmp_path):
    config = load_config(CONFIGS / "bicycle.yaml", ["lora.alpha=16"])
    again = validate_config(yaml.safe_load(config.to_yaml()), "config.yaml")
    assert isinstance(again, TrainConfig) and again == config
