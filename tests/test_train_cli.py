"""`motiondirector train` end to end on car-turn.mp4 with the tiny model: run folder, loading back, exit codes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from motiondirector.backbones import load_backbone
from motiondirector.cli import app
from motiondirector.config import validate_config
from motiondirector.lora.inject import activate, adapter_state_dict, add_adapter, load_adapter_weights
from motiondirector.lora.package import read_package

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_car_turn.yaml"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One record cache for the module: car-turn.mp4 is decoded and encoded once."""
    return tmp_path_factory.mktemp("cache")


def run_train(*args: str):
    return CliRunner().invoke(app, ["train", str(CONFIG), *args], catch_exceptions=False)


def message(result) -> str:
    """stderr without the console's line wrapping."""
    return " ".join(result.stderr.split())


def test_train_writes_a_run_folder_whose_loras_load_back(tiny_model_dir, cache_dir, tmp_path, car_turn):
    out = tmp_path / "run"
    result = run_train("--set", f"base={tiny_model_dir}", "--set", "steps=2", "--out", str(out),
                       "--cache-dir", str(cache_dir), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out_dir"] == str(out) and summary["steps"] == 2 and summary["routing"] == "per_video"
    assert summary["packages"] == {"temporal": str(out / "temporal"), "spatial": [str(out / "spatial" / "0")]}
    assert summary["checkpoints"] == [2] and {"loss_temporal", "loss_org", "loss_ad"} <= set(summary["losses"])

    # the run folder, exactly as docs/run-folder.md describes it
    config = validate_config(yaml.safe_load((out / "config.yaml").read_text()), "config.yaml")
    assert config.data.sources == [str(car_turn)] and config.base == str(tiny_model_dir)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2-0.gif", "step-2-0.mp4"]
    assert all(p.stat().st_size > 0 for p in (out / "samples").iterdir())
    assert sorted(p.name for p in (out / "checkpoints" / "step-2").iterdir()) == ["spatial", "temporal",
                                                                                 "training_state.pt"]
    assert json.loads((out / "summary.json").read_text()) == summary

    # the temporal LoRA loads into a fresh base model and changes its output
    manifest, state = read_package(out / "temporal")
    assert (manifest.kind, manifest.mode, manifest.rank, manifest.step) == ("temporal", "dual_path", 4, 2)
    assert manifest.captions == ["a car running on the road"] and len(manifest.data_fingerprints) == 1
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    assert manifest.base.architecture == backbone.architecture_fingerprint
    add_adapter(backbone.unet, "motion", manifest.targets, manifest.settings)
    load_adapter_weights(backbone.unet, "motion", state)
    assert all(torch.equal(adapter_state_dict(backbone.unet, "motion")[key], value) for key, value in state.items())
    torch.manual_seed(0)
    noisy, text = torch.randn(1, 4, 4, 16, 16), backbone.encode_text(["a car running on the road"])
    timestep = torch.tensor([500])
    base = backbone.predict(noisy, timestep, text)
    activate(backbone.unet, ["motion"])
    assert not torch.allclose(backbone.predict(noisy, timestep, text), base)
    spatial_manifest, _ = read_package(out / "spatial" / "0")
    assert spatial_manifest.kind == "spatial" and spatial_manifest.data_fingerprints == manifest.data_fingerprints


def test_sigint_checkpoints_exits_130_and_resume_finishes(tiny_model_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--set", f"base={tiny_model_dir}", "--set", "validation.every=0", "--out", str(out),
              "--cache-dir", str(cache_dir), "--json"]
    metrics = out / "metrics.jsonl"

    def interrupt_after_the_first_step():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt_after_the_first_step)
    sender.start()
    result = run_train(*common, "--set", "steps=500")
    sender.join()
    assert result.exit_code == 130, result.output
    stopped = json.loads(result.stdout)
    assert stopped["interrupted"] and 1 <= stopped["step"] < 500
    assert Path(stopped["checkpoint"]) == out / "checkpoints" / f"step-{stopped['step']}"
    assert (Path(stopped["checkpoint"]) / "training_state.pt").exists() and not (out / "summary.json").exists()

    # a different config is refused; a longer/shorter step count is not a different config
    refused = run_train(*common, "--set", f"steps={stopped['step'] + 1}", "--set", "optimizer.lr=0.5", "--resume")
    assert refused.exit_code == 2 and "changed: optimizer" in message(refused)
    resumed = run_train(*common, "--set", f"steps={stopped['step'] + 1}", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == stopped["step"] and (out / "summary.json").exists()


def test_exit_codes_for_bad_config_model_and_out(tiny_model_dir, cache_dir, tmp_path):
    typo = run_train("--set", f"base={tiny_model_dir}", "--set", "optimizer.lrr=1", "--out", str(tmp_path / "a"))
    assert typo.exit_code == 2 and "optimizer.lrr: unknown key (did you mean optimizer.lr?)" in message(typo)

    missing = run_train("--set", f"base={tmp_path / 'no-model'}", "--out", str(tmp_path / "b"),
                        "--cache-dir", str(cache_dir))
    assert missing.exit_code == 3 and "no-model" in message(missing)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    refused = run_train("--set", f"base={tiny_model_dir}", "--out", str(occupied), "--overwrite")
    assert refused.exit_code == 2 and "not a run folder" in message(refused)
    assert (occupied / "notes.txt").exists()
    no_flags = run_train("--set", f"base={tiny_model_dir}", "--out", str(occupied))
    assert no_flags.exit_code == 2 and "pass --resume to continue it or --overwrite" in message(no_flags)
