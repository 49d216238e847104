"""`motiondirector eval`: the paper's metrics for a folder of generated videos.

Prompts come from the generation sidecars (`<stem>.json` beside `<stem>.mp4`); a video without one
gets only temporal consistency. Writes `<out>/<stem>.json` per video and `<out>/summary.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

from motiondirector.metrics.clip_scores import ClipScorer, video_metrics
from motiondirector.storage import atomic_write

METRICS = ("clip_text_score", "temporal_consistency", "pickscore")


def sidecar_prompt(video: Path) -> str | None:
    sidecar = video.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        prompt = json.loads(sidecar.read_text()).get("prompt")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{sidecar}: not a generation sidecar ({error})") from None
    return prompt if isinstance(prompt, str) else None


def read_all_frames(video: Path):
    from motiondirector.data.video import probe_video, read_frames

    return read_frames(str(video), range(probe_video(str(video)).num_frames))


def evaluate_videos(videos_dir: str | Path, clip: ClipScorer, pickscore: ClipScorer | None = None,
                    out_dir: str | Path | None = None,
                    on_video: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Metrics of every `*.mp4` in `videos_dir`; returns (and writes) the summary."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise FileNotFoundError(f"{videos_dir}: no such folder")
    videos = sorted(videos_dir.glob("*.mp4"))
    if not videos:
        raise ValueError(f"{videos_dir}: no .mp4 videos to evaluate")
    out_dir = Path(out_dir) if out_dir else videos_dir / "metrics"
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {"clip": clip.name, "pickscore": pickscore.name if pickscore else None}
    rows = []
    for done, video in enumerate(videos, start=1):
        frames = read_all_frames(video)
        prompt = sidecar_prompt(video)
        row = {"video": video.name, "prompt": prompt, "frames": len(frames),
               **video_metrics(frames, prompt, clip, pickscore), "models": models}
        atomic_write(out_dir / f"{video.stem}.json", json.dumps(row, indent=2).encode())
        rows.append(row)
        if on_video is not None:
            on_video(done, len(videos))
    means = {}
    for metric in METRICS:
        values = [row[metric] for row in rows if row[metric] is not None]
        means[metric] = {"mean": fmean(values) if values else None, "videos": len(values)}
    summary = {"videos_dir": str(videos_dir.resolve()), "videos": len(rows), "models": models, "metrics": means,
               "per_video": rows}
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
