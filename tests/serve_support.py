"""Test data for the Serve tests: a catalog of random LoRA packages for the toy model (and one for another base)."""

from __future__ import annotations

from pathlib import Path

import torch
from test_package import write_random_package

from motiondirector import api
from motiondirector.video_io import write_gif

# name -> (kind, seed, tags); the toy model's packages
ENTRIES = {
    "zigzag": ("temporal", 1, ["zigzag", "demo"]),
    "orbit": ("temporal", 2, ["orbit"]),
    "bounce": ("temporal", 3, ["bounce", "demo"]),
    "red-square": ("spatial", 4, ["square"]),
    "blue-disc": ("spatial", 5, ["disc"]),
}


COLOURS = {"zigzag": (0.9, 0.2, 0.2), "bounce": (0.2, 0.5, 0.95), "red-square": (0.9, 0.15, 0.15),
           "blue-disc": (0.2, 0.35, 0.9)}


def preview_gif(path: Path, name: str) -> Path:
    """A little toy-world-like clip: a coloured square that zigzags/bounces, or sits still (appearances)."""
    kind = ENTRIES[name][0]
    colour = torch.tensor(COLOURS[name])
    frames = torch.ones(8, 32, 32, 3)
    for t in range(8):
        x, y = (4 + 3 * t, 12 + (6 if t % 2 else -6)) if name == "zigzag" else (12, 4 + abs(7 - 2 * t) * 3)
        if kind == "spatial":
            x, y = 10, 10
        frames[t, y:y + 10, x:x + 10] = colour
    return write_gif(frames, path, fps=4)


def build_test_catalog(root: Path) -> tuple[Path, dict[str, str]]:
    """A local catalog under `root` with ENTRIES (previews on all but 'orbit') + 'other-base' (tiny model)."""
    from motiondirector.backbones.tiny import write_tiny_model

    catalog = api.open_catalog(str(root / "catalog"))
    toy = api.load_backbone("toy", "cpu")
    ids = {}
    for name, (kind, seed, tags) in ENTRIES.items():
        package = write_random_package(toy, root / "packages" / name, kind, seed=seed, step=10 * seed)
        preview = None if name == "orbit" else preview_gif(root / f"{name}.gif", name)
        manifest = catalog.add(package, name=name, tags=tags, preview=preview,
                               description=f"test {kind} LoRA {name}",
                               lineage=[ids["zigzag"]] if name == "bounce" else ())
        ids[name] = manifest.id
    tiny = api.load_backbone(str(write_tiny_model(root / "tiny-model", seed=0)), "cpu")
    other = write_random_package(tiny, root / "packages" / "other-base", "temporal", seed=9)
    ids["other-base"] = catalog.add(other, name="other-base").id
    return Path(catalog.uri), ids
