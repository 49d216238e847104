"""The shared benchmarks page: each bench script owns one `## ...` section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, title: str, body: str) -> None:
    """Put `body` (starting with `title`) in place of that section of the page, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + body.rstrip("\n") + "\n" + ("" if end == -1 else text[end:])
    path.write_text(text)
