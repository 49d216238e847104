"""Toy-world benchmark, report and demo end to end on a tiny random model (CI never pretrains)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.commands.common import ExitCode
from motiondirector.sample import SamplingSettings
from motiondirector.toyworld.benchmark import (
    MODES,
    BenchmarkSettings,
    other_appearance_prompts,
    parse_appearance,
    reference_scenes,
    run_benchmark,
)
from motiondirector.toyworld.probes import distinctive_axis, motion_scores
from motiondirector.toyworld.render import Scene, render

FAST_SAMPLING = SamplingSettings(steps=2, guidance=3.0, frames=4, height=32, width=32)


@pytest.fixture(scope="module")
def toy_like_dir(tmp_path_factory):
    """A random tiny model with the toy world's vocabulary and 4x autoencoder."""
    from motiondirector.backbones.tiny import TinyModelConfig, write_tiny_model
    from motiondirector.toyworld.render import world_words

    config = TinyModelConfig(vae_channels=(8, 16, 16), words=world_words())
    return write_tiny_model(tmp_path_factory.mktemp("toy-like"), config=config, seed=0)


@pytest.fixture()
def toy_like(toy_like_dir):
    from motiondirector.backbones import load_backbone

    return load_backbone(str(toy_like_dir), "cpu")


def test_parse_appearance_and_other_prompts():
    assert parse_appearance("red circle on grey") == ("red", "circle", "grey")
    with pytest.raises(ValueError, match="exactly one shape"):
        parse_appearance("red on grey")
    reference = Scene("red", "circle", "grey", "zigzag")
    prompts = other_appearance_prompts(reference, 12, seed=0)
    assert len({p.caption for p in prompts}) == 12
    assert all(p.colour != "red" and p.shape != "circle" and p.background != "grey" and p.motion == "zigzag"
               for p in prompts)
    with pytest.raises(ValueError, match="only 12 appearances"):
        other_appearance_prompts(reference, 13, seed=0)


def test_benchmark_runs_every_mode_and_setting(toy_like, tmp_path):
    settings = BenchmarkSettings(videos=(1, 2), prompts=2, seeds=2, steps=2, rank=2, sampling=FAST_SAMPLING)
    result = run_benchmark(toy_like, settings, tmp_path, on_stage=lambda _: None)
    rows = result["rows"]
    assert [(r["setting"], r["mode"]) for r in rows] == [(s, m) for s in ("1 video", "2 videos") for m in MODES]
    assert result["samples_per_mode"] == 4
    for row in rows:
        metrics = row["metrics"]
        mean, ci = metrics["appearance"]
        assert 0.0 <= mean <= 1.0 and (np.isnan(ci) or ci >= 0)
        assert {"fidelity", "leak_any", "leak_colour", "colour", "shape", "background", "motion_fidelity",
                "x_corr", "y_corr", "distinct_corr", "distinct_amp"} <= set(metrics)
        assert np.isnan(metrics["scale_corr"][0])  # the zigzag keeps its size: no scale correlation
    base_rows = [r for r in rows if r["mode"] == "base"]
    assert base_rows[0]["metrics"] == base_rows[1]["metrics"]  # base is sampled once, shown per setting
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert len(saved["rows"]) == len(rows)
    logged = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["mode"]) for r in logged] == [(r["setting"], r["mode"]) for r in rows]
    assert len(logged[-1]["samples"]) == 4 and "distinct_corr" in logged[-1]["samples"][0]
    table = (tmp_path / "benchmark.md").read_text()
    # The motion, attribute, paired-Δ, per-prompt and reference-prompt tables.
    assert table.count("| dual_path |") == 10 and "motion fidelity" in table and "Δ y corr." in table
    for row in rows:
        assert len(row["reference_prompt_samples"]) == 4 and "y_corr" in row["reference_prompt"]
        assert ("paired" in row) == (row["mode"] != "base")
    dual = rows[3]
    expected = [a["x_corr"] - b["x_corr"] for a, b in zip(dual["samples"], rows[0]["samples"], strict=True)
                if a["x_corr"] is not None and b["x_corr"] is not None]
    if expected:
        assert dual["paired"]["x_corr"][0] == pytest.approx(np.mean(expected))
    assert "distinctive corr." in table and "y corr." in table and "colour leak" in table
    assert "one object per frame" in table
    assert (tmp_path / "grid-1-video.png").is_file() and (tmp_path / "gifs" / "2v-dual_path.gif").is_file()
    assert (tmp_path / "runs" / "2v-dual_path" / "temporal").is_dir()


def test_same_noise_across_modes(toy_like):
    from motiondirector.toyworld.evaluate import generate_scenes

    scenes = [Scene("blue", "square", "black", "zigzag")] * 2
    first = generate_scenes(toy_like, scenes, [5, 6], FAST_SAMPLING, batch=1)
    batched = generate_scenes(toy_like, scenes, [5, 6], FAST_SAMPLING, batch=2)
    assert first.shape == (2, 4, 32, 32, 3)
    assert torch.allclose(first, batched, atol=1e-4)


def test_report_command_writes_docs_section(toy_like_dir, tmp_path):
    docs = tmp_path / "toyworld.md"
    docs.write_text("intro\n<!-- report:begin -->\nold\n<!-- report:end -->\nrest\n")
    result = CliRunner().invoke(app, ["toyworld", "report", "--base", str(toy_like_dir), "--prompts", "2",
                                      "--held-out-prompts", "1", "--steps", "2", "--device", "cpu",
                                      "--out", str(tmp_path / "out"), "--docs", str(docs)])
    assert result.exit_code == 0, result.output
    text = docs.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| pretraining motions |" in text and "toyworld report" in text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["prompts"] == 2 and report["held_out_prompts"] == 1
    assert "one object per frame" in text and 0.0 <= report["pretrain_motions"]["one_object"][0] <= 1.0
    held_out_axes = text.split("per axis")[1].splitlines()
    assert "| x corr. | y corr. | distinctive corr. | distinctive amp. |" in held_out_axes
    assert -1.0 <= report["held_out_motion"]["distinct_corr"][0] <= 1.0


def test_render_command(tmp_path):
    out = tmp_path / "clip.mp4"
    result = CliRunner().invoke(app, ["toyworld", "render", "--prompt", "a red square moving left on a grey background",
                                      "--out", str(out), "--frames", "6", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert out.stat().st_size > 0 and len(payload["trajectory"]) == 6
    bad = CliRunner().invoke(app, ["toyworld", "render", "--prompt", "a red blob moving left on a grey background",
                                   "--out", str(out)])
    assert bad.exit_code == ExitCode.BAD_INPUT and "blob" in bad.output


def test_benchmark_settings_are_recorded(toy_like, tmp_path):
    settings = replace(BenchmarkSettings(videos=(1,), prompts=1, seeds=1, steps=1, rank=1, sampling=FAST_SAMPLING),
                       modes=("base",))
    result = run_benchmark(toy_like, settings, tmp_path, on_stage=lambda _: None)
    assert result["settings"]["sampling"]["steps"] == 2 and [r["mode"] for r in result["rows"]] == ["base"]


def test_per_prompt_table_groups_samples_by_prompt_across_runs():
    """Samples run-major, then prompt, then seed: 2 runs × 2 prompts × 2 seeds."""
    from motiondirector.toyworld.benchmark import per_prompt_table

    prompts = ["a green square moving in a zigzag on a white background",
               "a yellow square moving in a zigzag on a black background"]
    y = [0.1, 0.3, 0.5, 0.7, 0.2, 0.4, 0.9, None]
    samples = [{"y_corr": value, "distinct_amp": 0.1 * index} for index, value in enumerate(y)]
    result = {"prompts": prompts, "settings": {"seeds": 2},
              "rows": [{"setting": "6 videos", "mode": "dual_path", "samples": samples}]}
    header, _, line = per_prompt_table(result)[3:]
    assert header == "| setting | mode | green square, white | yellow square, black |"
    # green: samples 0, 1 (run 0) and 4, 5 (run 1); yellow: 2, 3 and 6, 7 (None is not counted).
    assert line == "| 6 videos | dual_path | 0.25 / 0.25 | 0.70 / 0.45 |"
    assert per_prompt_table({**result, "prompts": prompts[:1]}) == []


def test_training_runs_are_pooled_in_one_row(toy_like, tmp_path):
    """Two LoRAs per mode (seeds 0 and 1): one row with both runs' samples, paired with the base twice over."""
    from motiondirector.toyworld.benchmark import table_markdown

    settings = BenchmarkSettings(videos=(1,), prompts=1, seeds=2, steps=2, rank=2, sampling=FAST_SAMPLING,
                                 modes=("base", "dual_path"), training_runs=2)
    result = run_benchmark(toy_like, settings, tmp_path, on_stage=lambda _: None)
    base, lora = result["rows"]
    assert len(base["samples"]) == 2 and len(lora["samples"]) == 4 and len(lora["reference_prompt_samples"]) == 8
    assert [run["seed"] for run in lora["training_runs"]] == [0, 1]
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"1v-dual_path-seed0", "1v-dual_path-seed1"}
    seed0 = json.loads((tmp_path / "runs" / "1v-dual_path-seed0" / "summary.json").read_text())
    seed1 = json.loads((tmp_path / "runs" / "1v-dual_path-seed1" / "summary.json").read_text())
    assert seed0["losses"]["loss_temporal"] != seed1["losses"]["loss_temporal"]  # independently seeded trainings
    # The pooled mean is the mean of the two runs' means (equal sample counts); each run pairs with the base.
    x_corr = [run["metrics"]["x_corr"][0] for run in lora["training_runs"]]
    assert np.isfinite(x_corr).all() and lora["metrics"]["x_corr"][0] == pytest.approx(np.mean(x_corr))
    expected = np.mean([a["x_corr"] - b["x_corr"] for a, b in zip(lora["samples"], base["samples"] * 2,
                                                                              strict=True)])
    assert lora["paired"]["x_corr"][0] == pytest.approx(expected)
    markdown = table_markdown(result)
    assert "pools 2 training runs" in markdown and "| 1 video | dual_path | 1 |" in markdown
    assert "4 seeds × 2 training runs in the LoRA rows" in markdown
    with pytest.raises(ValueError, match="training_runs 0"):
        run_benchmark(toy_like, replace(settings, training_runs=0), tmp_path, on_stage=lambda _: None)


def test_mode_contrasts_pair_lora_rows_of_one_setting():
    """dual_path − coupled and dual_path − dual_path_no_ad, sample by sample, only within one setting."""
    from motiondirector.toyworld.benchmark import PAIRED_KEYS, mode_contrasts, table_markdown

    def row(setting, mode, y_values):
        samples = [{key: 0.0 for key in PAIRED_KEYS} | {"y_corr": y} for y in y_values]
        return {"setting": setting, "mode": mode, "samples": samples}

    rows = [row("4 videos", "base", [0.0, 0.0, 0.0]), row("4 videos", "coupled", [0.5, 0.1, 0.3]),
            row("4 videos", "dual_path", [0.9, 0.2, 0.4]), row("1 video", "dual_path_no_ad", [0.0, 0.0, 0.0]),
            row("1 video", "dual_path", [1.0, 1.0, 1.0, 1.0])]  # other setting; and its no-AD row has 3 samples
    contrasts = mode_contrasts(rows)
    assert [(c["setting"], c["contrast"]) for c in contrasts] == [("4 videos", "dual_path − coupled")]
    mean, ci = contrasts[0]["paired"]["y_corr"]
    assert mean == pytest.approx(np.mean([0.4, 0.1, 0.1])) and ci > 0
    assert contrasts[0]["paired"]["one_object"] == (0.0, 0.0)
    result = {"reference": "a red circle", "samples_per_mode": 3, "settings": {"seeds": 3}, "prompts": ["x"],
              "rows": [r | {"metrics": _metrics()} for r in rows[:3]]}
    assert "| 4 videos | dual_path − coupled | +0.00 ± 0.00 | +0.20 ± " in table_markdown(result)


def _metrics() -> dict:
    from motiondirector.toyworld.benchmark import MOTION_COLUMNS
    from motiondirector.toyworld.probes import ATTRIBUTES

    keys = [k for k, _ in MOTION_COLUMNS] + ["appearance", "leak_any", *ATTRIBUTES, *(f"leak_{a}" for a in ATTRIBUTES)]
    return {key: (0.0, 0.0) for key in keys}


def test_distinctive_component_of_the_zigzag():
    """The zigzag's vertical swing is its distinctive component; the left-to-right sweep alone does not pass."""
    reference = render(Scene("red", "circle", "grey", "zigzag"), seed=0).trajectory
    assert distinctive_axis(reference) == 1
    assert distinctive_axis(render(Scene("red", "circle", "grey", "right"), seed=0).trajectory) is None
    other = motion_scores(render(Scene("blue", "square", "black", "zigzag"), seed=5).trajectory, reference)
    assert other["distinct_corr"] > 0.99 and 0.9 < other["distinct_amp"] < 1.1 and other["motion_fidelity"] > 0.99
    assert other["scale_corr"] is None
    # Only the sweep: x right, no vertical swing -> x 1.0, y 0, and a fidelity of 0.25 (the axes mean says 0.5).
    sweep = motion_scores(render(Scene("blue", "square", "black", "right"), seed=5).trajectory, reference)
    assert sweep["x_corr"] > 0.99 and sweep["y_corr"] == 0.0 and sweep["distinct_amp"] < 1e-6
    assert sweep["motion_fidelity"] == pytest.approx(0.25, abs=0.01)
    # A half-height zigzag on a slope: the same shape after detrending, half the amplitude.
    half = reference.copy()
    half[:, 1] = 0.5 + 0.5 * (reference[:, 1] - reference[:, 1].mean()) + 0.02 * np.arange(8)
    scores = motion_scores(half, reference)
    assert scores["distinct_corr"] == pytest.approx(1.0, abs=1e-6)
    assert scores["distinct_amp"] == pytest.approx(0.5, abs=0.01)
    assert scores["y_corr"] < 0.99  # the slope hides part of the swing from the raw correlation


def test_a_diverged_run_becomes_a_row(toy_like, tmp_path):
    settings = BenchmarkSettings(videos=(1,), prompts=1, seeds=1, steps=30, rank=2, lr=15.0,
                                 sampling=FAST_SAMPLING, modes=("coupled",))
    from motiondirector.toyworld.benchmark import table_markdown

    result = run_benchmark(toy_like, settings, tmp_path, on_stage=lambda _: None)
    (row,) = result["rows"]
    assert "training diverged" in row["diverged"] and row["metrics"] == {}
    assert "| 1 video | coupled | training diverged |" in table_markdown(result)


def test_benchmark_command_runs_the_modes_asked(toy_like_dir, tmp_path):
    result = CliRunner().invoke(app, ["toyworld", "benchmark", "--base", str(toy_like_dir), "--videos", "1",
                                      "--prompts", "1", "--seeds", "1", "--sampling-steps", "2", "--modes", "base",
                                      "--high-share", "0.5", "--device", "cpu", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["mode"] for r in payload["rows"]] == ["base"] and payload["settings"]["high_share"] == 0.5
    assert "distinctive corr." in (tmp_path / "benchmark.md").read_text()


def test_varied_reference_looks_avoid_the_reference_and_every_prompt():
    reference = Scene("red", "circle", "grey", "zigzag")
    prompts = other_appearance_prompts(reference, 8, seed=0)
    scenes = reference_scenes(reference, prompts, 3, "varied")
    assert scenes[0] == reference and len({s.caption for s in scenes}) == 3
    asked = {p.caption for p in prompts}
    assert all(s.caption not in asked and s.colour != "red" and s.shape != "circle" and s.background != "grey"
               and s.motion == "zigzag" for s in scenes[1:])
    assert reference_scenes(reference, prompts, 3, "same") == [reference] * 3
    with pytest.raises(ValueError, match="only 4 are left"):
        reference_scenes(reference, prompts, 6, "varied")


def test_attribute_looks_change_only_their_attributes_and_are_never_prompts():
    reference = Scene("red", "circle", "grey", "zigzag")
    prompts = other_appearance_prompts(reference, 12, seed=0)  # every look that differs in all three
    asked = {p.caption for p in prompts}

    def changed(scene: Scene) -> list[str]:
        return [a for a in ("colour", "shape", "background") if getattr(scene, a) != getattr(reference, a)]

    colours = reference_scenes(reference, prompts, 4, "colour")
    assert colours[0] == reference and [s.colour for s in colours[1:]] == ["green", "blue", "yellow"]
    assert all(changed(s) == ["colour"] for s in colours[1:])
    assert [s.background for s in reference_scenes(reference, prompts, 3, "background")[1:]] == ["black", "white"]
    assert [changed(s) for s in reference_scenes(reference, prompts, 3, "shape")[1:]] == [["shape"], ["shape"]]
    # one-factor: the attributes in turn, so four videos already vary each of them; 1 + 3 + 2 + 2 looks in all
    every = reference_scenes(reference, prompts, 8, "one-factor")
    assert [changed(s) for s in every[1:4]] == [["colour"], ["shape"], ["background"]]
    assert len({s.caption for s in every}) == 8 and not asked & {s.caption for s in every}
    assert all(len(changed(s)) == 1 for s in every[1:])
    # colour-background: every colour/background pair on the reference's shape, so no prompt's shape is seen
    pairs = reference_scenes(reference, prompts, 12, "colour-background")
    assert {s.shape for s in pairs} == {"circle"} and not asked & {s.caption for s in pairs}
    assert len({(s.colour, s.background) for s in pairs}) == 12
    assert {(p.colour, p.background) for p in prompts} <= {(s.colour, s.background) for s in pairs}
    with pytest.raises(ValueError, match="13 videos of colour × background need 12 appearances.*only 11"):
        reference_scenes(reference, prompts, 13, "colour-background")
    with pytest.raises(ValueError, match="4 videos of background only need 3 appearances.*only 2"):
        reference_scenes(reference, prompts, 4, "background")
    with pytest.raises(ValueError, match="expected one of same, varied"):
        reference_scenes(reference, prompts, 1, "mixed")


def test_demo_shows_the_lora_on_a_new_look_and_on_the_reference_prompt(toy_like_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(toy_like_dir, model)
    (model / "motiondirector.json").write_text(json.dumps({"defaults": {
        "frames": 4, "height": 32, "width": 32, "fps": 8.0, "steps": 2, "guidance": 3.0}}))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--base", str(model), "--steps", "2", "--videos", "2", "--out", str(out),
                                      "--device", "cpu", "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    payload = json.loads(result.stdout)
    videos = payload["videos"]
    assert set(videos) == {"with-lora", "base", "with-lora-reference-prompt", "base-reference-prompt"}
    for label, rows in videos.items():
        assert len(rows) == 2 and all(Path(row["files"]["mp4"]).is_file() for row in rows)
        on_reference = label.endswith("reference-prompt")
        assert all(row["prompt"] == (payload["reference"]["prompt"] if on_reference else payload["prompt"])
                   for row in rows)
        assert all(("leak_any" in row["scores"]) != on_reference for row in rows)  # no leakage on its own look
    assert [row["seed"] for row in videos["with-lora"]] == [row["seed"] for row in videos["base"]]  # same noise
    assert (out / "run" / "temporal").is_dir() and (out / "reference.gif").is_file()
    # Six training looks by default (the multi-video setting), none of them the generated new look.
    looks = payload["training_clips"]
    assert len(looks) == 6 == len(set(looks)) and looks[0] == payload["reference"]["prompt"]
    assert payload["prompt"] not in looks
    trained = json.loads((out / "run" / "summary.json").read_text())
    assert len(trained["packages"]["spatial"]) == 6  # dual-path: one spatial (appearance) LoRA per training clip

    too_many = CliRunner().invoke(app, ["demo", "--base", str(model), "--looks", "13", "--out", str(tmp_path / "x"),
                                        "--device", "cpu"])
    assert too_many.exit_code != ExitCode.OK and "--looks 13" in too_many.output and "only 11" in too_many.output
