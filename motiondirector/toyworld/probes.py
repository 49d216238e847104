"""Analytic probes of toy-world videos and the benchmark's metrics (definitions: docs/toyworld.md).

A probe reads decoded frames only: background colour (median of all pixels), object colour
(median of the pixels far from the background), a soft object mask (each pixel's share of the way
from the background colour to the object colour), and from it per-frame centroid, area and shape.
Shape comes from normalised central moments of the mask, which survive the autoencoder's blur
(fill ratios do not): the up-pointing triangle has its mass low (vertical skewness about -0.57),
and a square's x and y are independent (mu22 / (mu20 mu02) = 1, disk 2/3), blurred or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from motiondirector.toyworld.render import BACKGROUNDS, OBJECT_COLOURS, Scene

NONE = "none"  # no object found
ATTRIBUTES = ("colour", "shape", "background")
SIGNALS = ("x", "y", "area")
# A pixel this far (RGB Euclidean, [0, 1] units) from the background surely belongs to the object.
_CORE_DISTANCE = 0.3
# Soft-mask weights below this are treated as background noise.
_MIN_WEIGHT = 0.15
# Shape moments use a stricter mask, windowed around the object, so stray pixels do not dominate them.
_SHAPE_WEIGHT = 0.3
_SHAPE_WINDOW_SIGMAS = 2.2
# Decision thresholds, halfway between the shapes' values on autoencoder reconstructions.
_TRIANGLE_SKEW = -0.2
_SQUARE_CROSS = 0.785
# A frame needs at least this share of the image covered to count as showing the object.
_MIN_AREA = 0.004


@dataclass(frozen=True)
class Probe:
    colour: str
    shape: str
    background: str
    trajectory: np.ndarray  # (F, 3): centroid x, y in [0, 1] and area share; NaN where no object
    skewness: float  # median vertical skewness of the object mask over frames (triangle < 0)
    cross_moment: float  # median mu22 / (mu20 mu02) over frames (square ~1, circle ~2/3)

    def attribute(self, name: str) -> str:
        return getattr(self, name)


def _as_float_frames(frames) -> np.ndarray:
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {tuple(array.shape)}")
    return array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - colour) ** 2)))


def probe(frames) -> Probe:
    """Probe one video: frames (F, H, W, 3) as uint8 or float in [0, 1] (numpy or torch)."""
    video = _as_float_frames(frames)
    n_frames, height, width, _ = video.shape
    # The object covers well under half of the frame, so the median pixel is background (the border
    # alone is not: generated frames often carry a halo along the edges).
    background = np.median(video.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(video - background, axis=-1)
    core = distance > _CORE_DISTANCE
    trajectory = np.full((n_frames, 3), np.nan)
    if not core.any():
        return Probe(NONE, NONE, _nearest(background, BACKGROUNDS), trajectory, float("nan"), float("nan"))
    colour = np.median(video[core], axis=0)
    direction = colour - background
    weight = np.clip((video - background) @ direction / float(direction @ direction), 0.0, 1.0)
    weight[weight < _MIN_WEIGHT] = 0.0
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    moments = []
    for f in range(n_frames):
        mass = weight[f].sum()
        if mass / (height * width) < _MIN_AREA:
            continue
        trajectory[f] = ((weight[f].sum(axis=0) @ xs) / mass, (weight[f].sum(axis=1) @ ys) / mass,
                         mass / (height * width))
        moments.append(_shape_moments(np.where(weight[f] >= _SHAPE_WEIGHT, weight[f], 0.0)))
    moments = [m for m in moments if m is not None]
    if not moments:
        return Probe(NONE, NONE, _nearest(background, BACKGROUNDS), trajectory, float("nan"), float("nan"))
    skewness, cross = (float(v) for v in np.median(np.array(moments), axis=0))
    shape = "triangle" if skewness < _TRIANGLE_SKEW else "square" if cross > _SQUARE_CROSS else "circle"
    return Probe(_nearest(colour, OBJECT_COLOURS), shape, _nearest(background, BACKGROUNDS), trajectory,
                 skewness, cross)


def _shape_moments(mask: np.ndarray) -> tuple[float, float] | None:
    """(vertical skewness, mu22 / (mu20 mu02)) of a weighted mask, windowed around its centre."""
    rows, columns = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5

    def centred(weights: np.ndarray):
        mass = weights.sum()
        if mass < 1.0:
            return None
        dx = columns - (weights * columns).sum() / mass
        dy = rows - (weights * rows).sum() / mass
        mu20, mu02 = (weights * dx * dx).sum() / mass, (weights * dy * dy).sum() / mass
        return None if min(mu20, mu02) <= 1e-6 else (mass, dx, dy, mu20, mu02)

    for _ in range(2):  # shrink the window onto the object twice, then measure
        stats = centred(mask)
        if stats is None:
            return None
        _, dx, dy, mu20, mu02 = stats
        mask = mask * ((np.abs(dx) <= _SHAPE_WINDOW_SIGMAS * np.sqrt(mu20) + 1)
                       & (np.abs(dy) <= _SHAPE_WINDOW_SIGMAS * np.sqrt(mu02) + 1))
    stats = centred(mask)
    if stats is None:
        return None
    mass, dx, dy, mu20, mu02 = stats
    skewness = (mask * dy ** 3).sum() / mass / mu02 ** 1.5
    return float(skewness), float((mask * dx * dx * dy * dy).sum() / mass / (mu20 * mu02))


# --- metrics ---------------------------------------------------------------------------------

def _is_constant(signal: np.ndarray, name: str) -> bool:
    """Reference signals that do not move are skipped (area: relative to its mean)."""
    scale = np.nanmean(np.abs(signal)) if name == "area" else 1.0
    return not np.isfinite(scale) or float(np.nanstd(signal)) < 0.01 * (5.0 if name == "area" else 1.0) * scale


def _fill_gaps(signal: np.ndarray) -> np.ndarray | None:
    """Missing frames take the value of the nearest frames (linear); None if no frame is valid."""
    valid = np.isfinite(signal)
    if not valid.any():
        return None
    index = np.arange(len(signal))
    return np.interp(index, index[valid], signal[valid])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (no shared movement)."""
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / norm if norm > 1e-12 else 0.0


def motion_fidelity(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean Pearson correlation over the reference's non-constant signals (x, y, area); NaN if none move."""
    if generated.shape != reference.shape:
        raise ValueError(f"trajectories differ in shape: generated {generated.shape}, reference {reference.shape}")
    scores = []
    for column, name in enumerate(SIGNALS):
        ref = _fill_gaps(reference[:, column])
        if ref is None or _is_constant(ref, name):
            continue
        gen = _fill_gaps(generated[:, column])
        scores.append(0.0 if gen is None else pearson(gen, ref))
    return float(np.mean(scores)) if scores else float("nan")


# A reference axis whose detrended trajectory varies less than this (std, share of the frame) has no
# distinctive component: straight-line motions are all trend (rendering jitter is ~0.001).
_DISTINCT_MIN_STD = 0.02
POSITION_AXES = ("x", "y")


def detrend(signal: np.ndarray) -> np.ndarray:
    """The signal minus its least-squares line over the frame index (what a straight path does not explain)."""
    index = np.arange(len(signal), dtype=np.float64)
    if len(signal) < 3:
        return np.zeros(len(signal))
    slope, intercept = np.polyfit(index, signal, 1)
    return signal - (slope * index + intercept)


def distinctive_axis(reference: np.ndarray) -> int | None:
    """Column (0 = x, 1 = y) of the reference's largest non-linear position component, None if it has none.

    For the zigzag this is y (its vertical swing; x only sweeps left to right); straight motions have none.
    """
    best, best_std = None, _DISTINCT_MIN_STD
    for column in range(len(POSITION_AXES)):
        ref = _fill_gaps(reference[:, column])
        if ref is None:
            continue
        spread = float(np.std(detrend(ref)))
        if spread >= best_std:
            best, best_std = column, spread
    return best


def motion_scores(generated: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """Per-axis correlations, the distinctive component, and the motion fidelity that weighs it.

    - `x_corr`, `y_corr`, `scale_corr`: Pearson correlation of each signal with the reference's (None
      where the reference does not move on it; 0 where the video shows no object);
    - `distinct_corr`: correlation of the detrended distinctive axis (`distinctive_axis`) with the
      reference's; `distinct_amp`: std of the generated detrended axis / the reference's (1 = the
      same swing, 0 = a straight path); both None if the reference has no distinctive component;
    - `motion_fidelity`: ½ · mean of the axis correlations + ½ · `distinct_corr` when there is a
      distinctive component (else the plain mean): a video that only gets the zigzag's left-to-right
      sweep right scores 0.25, not 0.5.
    """
    if generated.shape != reference.shape:
        raise ValueError(f"trajectories differ in shape: generated {generated.shape}, reference {reference.shape}")
    scores: dict[str, float | None] = {}
    for column, name in enumerate(SIGNALS):
        ref = _fill_gaps(reference[:, column])
        key = "scale_corr" if name == "area" else f"{name}_corr"
        if ref is None or _is_constant(ref, name):
            scores[key] = None
            continue
        gen = _fill_gaps(generated[:, column])
        scores[key] = 0.0 if gen is None else pearson(gen, ref)
    axis = distinctive_axis(reference)
    scores["distinct_corr"] = scores["distinct_amp"] = None
    if axis is not None:
        ref = detrend(_fill_gaps(reference[:, axis]))
        gen = _fill_gaps(generated[:, axis])
        gen = np.zeros_like(ref) if gen is None else detrend(gen)
        scores["distinct_corr"] = pearson(gen, ref)
        scores["distinct_amp"] = float(np.std(gen) / np.std(ref))
    axes = [v for k, v in scores.items() if k.endswith("_corr") and k != "distinct_corr" and v is not None]
    mean = float(np.mean(axes)) if axes else float("nan")
    scores["motion_fidelity"] = mean if axis is None else 0.5 * mean + 0.5 * scores["distinct_corr"]
    return scores


def appearance_hits(found: Probe, asked: Scene) -> dict[str, bool]:
    """Per attribute: does the video show what the prompt asked for?"""
    return {name: found.attribute(name) == getattr(asked, name) for name in ATTRIBUTES}


def leakage_hits(found: Probe, asked: Scene, reference: Scene) -> dict[str, bool | None]:
    """Per attribute: does the video show the reference's value where the prompt asked for another?

    None where the prompt asked for the reference's own value (not counted); "any" is True when
    at least one counted attribute leaked (None if no attribute was counted).
    """
    hits: dict[str, bool | None] = {}
    for name in ATTRIBUTES:
        wanted, original = getattr(asked, name), getattr(reference, name)
        hits[name] = None if wanted == original else found.attribute(name) == original
    counted = [hit for hit in hits.values() if hit is not None]
    hits["any"] = any(counted) if counted else None
    return hits


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval (NaNs dropped)."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    if array.size == 1:
        return float(array[0]), float("nan")
    return float(array.mean()), float(1.96 * array.std(ddof=1) / math.sqrt(array.size))


# --- object count and direction ------------------------------------------------------------------

# A pixel this far (RGB Euclidean, [0, 1] units) from the background is part of *some* object, of
# whatever colour (the fringes a sample may show count too).
_OBJECT_DISTANCE = 0.25
# Components smaller than this share of the frame are specks, not objects (as _MIN_AREA).
_MIN_COMPONENT = _MIN_AREA


def _components(mask: np.ndarray, min_pixels: int) -> int:
    """Number of 8-connected components of a boolean mask with at least `min_pixels` pixels."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, size = [start], 0
        while stack:
            row, column = stack.pop()
            size += 1
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, column + dc
                    if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        stack.append((r, c))
        count += size >= min_pixels
    return count


def object_counts(frames) -> list[int]:
    """Per frame: how many separate objects (connected regions far from the background colour) it shows."""
    video = _as_float_frames(frames)
    _, height, width, _ = video.shape
    background = np.median(video.reshape(-1, 3), axis=0)
    far = np.linalg.norm(video - background, axis=-1) > _OBJECT_DISTANCE
    min_pixels = max(1, math.ceil(_MIN_COMPONENT * height * width))
    return [_components(mask, min_pixels) for mask in far]


def one_object_share(frames) -> float:
    """Share of frames showing exactly one object (the world's rule; target >= 95%)."""
    counts = object_counts(frames)
    return sum(count == 1 for count in counts) / len(counts)


# Which trajectory column carries each directional motion, and the sign of its change over time
# (image y points down, so "up" decreases y).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1),
                                          "grow": (2, 1), "shrink": (2, -1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
# A sample follows a direction when its slope along that axis has the right sign and at least this
# share of the reference's size (a still object is not a coin toss that counts half the time).
_MIN_SLOPE_SHARE = 0.2


def _slope(signal: np.ndarray) -> float | None:
    filled = _fill_gaps(signal)
    if filled is None or np.isfinite(signal).sum() < 2:
        return None
    return float(np.polyfit(np.arange(len(filled)), filled, 1)[0])


def follows_direction(generated: np.ndarray, reference: np.ndarray, motion: str) -> bool:
    """Does a trajectory move along `motion`'s axis the way the reference (a render of `motion`) does?"""
    if motion not in DIRECTIONS:
        raise ValueError(f"motion {motion!r} has no direction; directional motions: {', '.join(DIRECTIONS)}")
    column, _ = DIRECTIONS[motion]
    wanted, found = _slope(reference[:, column]), _slope(generated[:, column])
    if wanted is None or found is None or wanted == 0:
        return False
    return found * wanted > 0 and abs(found) >= _MIN_SLOPE_SHARE * abs(wanted)
