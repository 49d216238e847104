"""A deterministic synthetic video world: one flat-coloured object moving on a plain background.

Every clip is fully described by a `Scene` (colour, shape, background, motion) and a seed (which
jitters start position, size and phase). The renderer returns frames and the ground-truth per-frame
trajectory (centroid x, y and area, measured on the rendered coverage), and the caption template
turns a scene into a prompt such as "a red square moving left on a grey background".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import product

import numpy as np

OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.5, 0.5, 0.5),
    "black": (0.04, 0.04, 0.04),
    "white": (0.96, 0.96, 0.96),
}
SHAPES = ("square", "circle", "triangle")

# Motion name -> the words of the caption that describe it.
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "orbit": "orbiting",
    "zigzag": "moving in a zigzag",
    "bounce": "bouncing",
    "grow": "growing",
    "shrink": "shrinking",
}
MOTIONS = tuple(MOTION_PHRASES)
# The paper's "novel motion": never shown in pretraining, learnt by the motion LoRA.
HELD_OUT_MOTION = "zigzag"
PRETRAIN_MOTIONS = tuple(m for m in MOTIONS if m != HELD_OUT_MOTION)

_FILLER_WORDS = ("a", "an", "the", "on", "in", "background")
# Half-side of the object's bounding box as a share of the shorter frame side.
_BASE_HALF_SIZE = 0.18
_SUPERSAMPLE = 4


def world_words() -> tuple[str, ...]:
    """Every word a caption of this world can contain (each must be one tokenizer token)."""
    words = list(_FILLER_WORDS) + list(OBJECT_COLOURS) + list(SHAPES) + list(BACKGROUNDS)
    for phrase in MOTION_PHRASES.values():
        words.extend(phrase.split())
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    motion: str

    def __post_init__(self) -> None:
        for field, value, valid in (("colour", self.colour, OBJECT_COLOURS), ("shape", self.shape, SHAPES),
                                    ("background", self.background, BACKGROUNDS), ("motion", self.motion, MOTIONS)):
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {MOTION_PHRASES[self.motion]} on a {self.background} background"

    def replace(self, **changes: str) -> Scene:
        return Scene(**{**self.__dict__, **changes})


@dataclass(frozen=True)
class Clip:
    """Frames (F, H, W, 3) uint8 and the ground truth: trajectory (F, 3) = x, y in [0, 1] and area share."""

    scene: Scene
    seed: int
    frames: np.ndarray
    trajectory: np.ndarray

    @property
    def caption(self) -> str:
        return self.scene.caption


def all_scenes(motions: tuple[str, ...] = MOTIONS) -> list[Scene]:
    return [Scene(c, s, b, m) for m, c, s, b in product(motions, OBJECT_COLOURS, SHAPES, BACKGROUNDS)]


def parse_caption(prompt: str) -> Scene:
    """Read a scene back from a caption in this world's template (word order is free)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    found: dict[str, str] = {}
    motion_words = {w for phrase in MOTION_PHRASES.values() for w in phrase.split()}
    unknown = [w for w in words if w not in world_words()]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown word(s) {', '.join(unknown)}; valid colours: "
                         f"{', '.join(OBJECT_COLOURS)}; shapes: {', '.join(SHAPES)}; backgrounds: "
                         f"{', '.join(BACKGROUNDS)}; motions: {'; '.join(MOTION_PHRASES.values())}")
    for field, valid in (("colour", OBJECT_COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        hits = [w for w in words if w in valid]
        if len(set(hits)) != 1:
            raise ValueError(f"prompt {prompt!r}: expected exactly one {field} ({', '.join(valid)}), "
                             f"found {hits or 'none'}")
        found[field] = hits[0]
    text = " ".join(w for w in words if w in motion_words)
    motions = [m for m, phrase in MOTION_PHRASES.items() if re.search(rf"\b{phrase}\b", text)]
    if len(motions) != 1:
        raise ValueError(f"prompt {prompt!r}: expected exactly one motion, one of: "
                         f"{'; '.join(MOTION_PHRASES.values())}")
    return Scene(found["colour"], found["shape"], found["background"], motions[0])


def _triangle_wave(t: np.ndarray) -> np.ndarray:
    """Period-1 wave through 0 at t=0, +1 at 1/4, 0 at 1/2, -1 at 3/4 (piecewise linear)."""
    return 1.0 - 4.0 * np.abs(np.mod(t + 0.25, 1.0) - 0.5)


def motion_path(motion: str, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame object centre (x, y in [0, 1]) and size multiplier, jittered by `rng`."""
    if motion not in MOTION_PHRASES:
        raise ValueError(f"unknown motion {motion!r}; valid: {', '.join(MOTIONS)}")
    span = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)  # endpoints included
    cycle = np.arange(frames) / frames  # periodic motions: the last frame does not repeat the first
    jitter = rng.uniform(-0.05, 0.05, size=2)
    across = rng.uniform(0.35, 0.65)
    ones = np.ones(frames)
    x, y, size = 0.5 + jitter[0] * ones, 0.5 + jitter[1] * ones, ones
    if motion in ("left", "right"):
        sweep = 0.25 - 0.5 * span
        x, y = 0.5 + jitter[0] + (sweep if motion == "left" else -sweep), across * ones
    elif motion in ("up", "down"):
        sweep = 0.25 - 0.5 * span
        x, y = across * ones, 0.5 + jitter[1] + (sweep if motion == "up" else -sweep)
    elif motion == "orbit":
        # Image y points down, so increasing angle turns clockwise on screen.
        angle = rng.uniform(0.0, 2 * math.pi) + 2 * math.pi * cycle
        x, y = x + 0.2 * np.cos(angle), y + 0.2 * np.sin(angle)
    elif motion == "zigzag":
        x = 0.25 + jitter[0] + 0.5 * span
        y = y + 0.15 * _triangle_wave(2 * cycle)
    elif motion == "bounce":
        y = 0.7 + jitter[1] - 0.4 * np.abs(np.sin(2 * math.pi * cycle))
    elif motion in ("grow", "shrink"):
        size = 0.55 + 0.9 * (span if motion == "grow" else 1.0 - span)
    return x, y, size


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    # Triangle pointing up inside the same bounding box.
    return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)


def render(scene: Scene, *, frames: int = 8, size: int | tuple[int, int] = 32, seed: int = 0) -> Clip:
    """Render a clip; identical inputs give identical bytes."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    height, width = (size, size) if isinstance(size, int) else size
    if height < 8 or width < 8:
        raise ValueError(f"size must be at least 8x8 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    xs, ys, sizes = motion_path(scene.motion, frames, rng)
    half = _BASE_HALF_SIZE * rng.uniform(0.92, 1.08) * min(height, width)
    # Anti-aliasing: coverage is evaluated on a finer grid of sample points, then averaged per pixel.
    fine_y = (np.arange(height * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    fine_x = (np.arange(width * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    grid_y, grid_x = np.meshgrid(fine_y, fine_x, indexing="ij")
    colour = np.array(OBJECT_COLOURS[scene.colour])
    background = np.array(BACKGROUNDS[scene.background])
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    trajectory = np.empty((frames, 3))
    for f in range(frames):
        inside = _coverage(scene.shape, grid_x - xs[f] * width, grid_y - ys[f] * height, half * sizes[f])
        cover = inside.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE).mean(axis=(1, 3))
        pixels = background + cover[..., None] * (colour - background)
        video[f] = np.round(pixels * 255).astype(np.uint8)
        weight = inside.sum()
        trajectory[f] = (grid_x[inside].sum() / weight / width if weight else np.nan,
                         grid_y[inside].sum() / weight / height if weight else np.nan,
                         cover.mean())
    return Clip(scene=scene, seed=seed, frames=video, trajectory=trajectory)
