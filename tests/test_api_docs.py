"""docs/api.md's walk-through runs as written (from the repository root, on the embedded toy model)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_walkthrough_runs(tmp_path, monkeypatch, reference_dir):
    text = (ROOT / "docs" / "api.md").read_text()
    (block,) = re.findall(r"## A walk-through \(runnable\).*?```python\n(.*?)```", text, flags=re.S)
    # Run where docs say (the repository root's relative paths), writing into a temporary copy of them.
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    (data / "reference").symlink_to(reference_dir)
    work = tmp_path / "main"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict = {}
    exec(compile(block, "docs/api.md", "exec"), namespace)
    assert tuple(namespace["video"].frames.shape) == (8, 32, 32, 3)
    assert [event.step for event in namespace["recorder"].of(namespace["api"].CheckpointWritten)] == [3, 6]
    assert {path.suffix for path in namespace["files"].values()} == {".mp4", ".gif", ".png", ".json"}
    assert [m.kind for m in namespace["manifests"]][0] == "temporal"
