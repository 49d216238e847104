"""Paper metrics on a tiny random CLIP: values against CLIP's own forward, ranges, the eval command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_generate import said
from typer.testing import CliRunner

from motiondirector.backbones.tiny import BASIC_WORDS, build_tokenizer
from motiondirector.cli import app
from motiondirector.commands.common import ExitCode
from motiondirector.metrics.clip_scores import ClipScorer, temporal_consistency, text_frame_score
from motiondirector.video_io import write_video


def write_tiny_clip(folder, seed, logit_scale=None):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tokenizer(BASIC_WORDS, 16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    if logit_scale is not None:
        model.logit_scale.data.fill_(math.log(logit_scale))
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return write_tiny_clip(root / "clip", seed=0), write_tiny_clip(root / "pick", seed=1, logit_scale=50.0)


def random_frames(count, seed):
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def test_scores_match_clip_forward_and_ranges(clip_dirs):
    scorer = ClipScorer.load(str(clip_dirs[0]))
    frames = random_frames(4, 0)
    inputs = scorer.processor(text=["a red car"], images=list(frames), return_tensors="pt", padding=True)
    with torch.no_grad():
        output = scorer.model(**inputs)
    # CLIP's own logits_per_image are logit_scale · cos(image, text).
    assert text_frame_score(scorer, "a red car", frames) == pytest.approx(
        float(output.logits_per_image[:, 0].mean()), abs=1e-4)
    embeds = torch.nn.functional.normalize(output.image_embeds, dim=-1)
    expected = float((embeds[:-1] * embeds[1:]).sum(-1).mean() * 100)
    assert temporal_consistency(scorer, frames) == pytest.approx(expected, abs=1e-4)
    assert -100.0 <= expected < 100.0
    still = np.repeat(frames[:1], 4, axis=0)
    assert temporal_consistency(scorer, still) == pytest.approx(100.0, abs=1e-3)
    assert abs(text_frame_score(scorer, "a red car", frames)) <= scorer.logit_scale
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_consistency(scorer, frames[:1])


def test_pickscore_uses_its_own_weights_and_logit_scale(clip_dirs):
    clip, pick = ClipScorer.load(str(clip_dirs[0])), ClipScorer.load(str(clip_dirs[1]))
    frames = random_frames(3, 1)
    assert pick.logit_scale == pytest.approx(50.0)
    cosines = pick.frame_embeddings(frames) @ pick.text_embeddings(["a dog"]).T
    assert text_frame_score(pick, "a dog", frames) == pytest.approx(float(cosines.mean() * 50.0), abs=1e-4)
    assert text_frame_score(pick, "a dog", frames) != pytest.approx(text_frame_score(clip, "a dog", frames))


def test_eval_command_writes_per_video_metrics_and_summary(clip_dirs, tmp_path):
    videos = tmp_path / "videos"
    write_video(random_frames(4, 2), videos / "0-a-red-car-1.mp4", fps=8)
    (videos / "0-a-red-car-1.json").write_text(json.dumps({"prompt": "a red car", "seed": 1}))
    write_video(np.repeat(random_frames(1, 3), 4, axis=0), videos / "1-still-2.mp4", fps=8)
    (videos / "1-still-2.json").write_text(json.dumps({"prompt": "a blue cat", "seed": 2}))
    write_video(random_frames(3, 4), videos / "external.mp4", fps=8)  # no sidecar: no prompt
    result = CliRunner().invoke(app, ["eval", str(videos), "--clip", str(clip_dirs[0]), "--pickscore",
                                      str(clip_dirs[1]), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["videos"] == 3
    assert {m: v["videos"] for m, v in summary["metrics"].items()} == {
        "clip_text_score": 2, "temporal_consistency": 3, "pickscore": 2}
    rows = {row["video"]: row for row in summary["per_video"]}
    assert rows["1-still-2.mp4"]["temporal_consistency"] == pytest.approx(100.0, abs=0.5)
    assert rows["external.mp4"]["prompt"] is None and rows["external.mp4"]["pickscore"] is None
    assert summary["metrics"]["temporal_consistency"]["mean"] == pytest.approx(
        np.mean([row["temporal_consistency"] for row in rows.values()]))
    written = sorted(p.name for p in (videos / "metrics").iterdir())
    assert written == ["0-a-red-car-1.json", "1-still-2.json", "external.json", "summary.json"]
    assert json.loads((videos / "metrics" / "0-a-red-car-1.json").read_text())["prompt"] == "a red car"


def test_eval_reports_missing_models_and_videos(clip_dirs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tmp_path), "--clip", "nobody/no-such-clip", "--device", "cpu"])
    assert result.exit_code == ExitCode.MODEL_UNAVAILABLE and "'nobody/no-such-clip' is not available" in said(result)
    result = runner.invoke(app, ["eval", str(tmp_path), "--clip", str(clip_dirs[0]), "--device", "cpu"])
    assert result.exit_code == ExitCode.BAD_INPUT and "no .mp4 videos" in said(result)
