"""Toy world: renderer determinism and trajectories, caption parsing, probes and metric formulas."""

from __future__ import annotations

import re

import numpy as np
import pytest

from motiondirector.toyworld import probes
from motiondirector.toyworld.render import (
    BACKGROUNDS,
    HELD_OUT_MOTION,
    MOTIONS,
    OBJECT_COLOURS,
    PRETRAIN_MOTIONS,
    SHAPES,
    Scene,
    all_scenes,
    parse_caption,
    render,
    world_words,
)


def test_world_size_and_held_out_motion():
    assert len(SHAPES) >= 3 and len(OBJECT_COLOURS) >= 4 and len(BACKGROUNDS) >= 3 and len(MOTIONS) >= 6
    assert HELD_OUT_MOTION in MOTIONS and HELD_OUT_MOTION not in PRETRAIN_MOTIONS
    assert len(all_scenes()) == len(SHAPES) * len(OBJECT_COLOURS) * len(BACKGROUNDS) * len(MOTIONS)


def test_render_is_deterministic_and_seeded():
    scene = Scene("red", "circle", "grey", "orbit")
    first, again = render(scene, seed=3), render(scene, seed=3)
    assert first.frames.shape == (8, 32, 32, 3) and first.frames.dtype == np.uint8
    assert np.array_equal(first.frames, again.frames) and np.array_equal(first.trajectory, again.trajectory)
    assert not np.array_equal(first.frames, render(scene, seed=4).frames)


def test_render_any_frame_count_and_size():
    clip = render(Scene("blue", "square", "black", "left"), frames=5, size=(24, 40), seed=1)
    assert clip.frames.shape == (5, 24, 40, 3) and clip.trajectory.shape == (5, 3)


@pytest.mark.parametrize(("motion", "check"), [
    ("left", lambda t: np.all(np.diff(t[:, 0]) < 0) and np.ptp(t[:, 1]) < 1e-6),
    ("right", lambda t: np.all(np.diff(t[:, 0]) > 0)),
    ("up", lambda t: np.all(np.diff(t[:, 1]) < 0) and np.ptp(t[:, 0]) < 1e-6),
    ("down", lambda t: np.all(np.diff(t[:, 1]) > 0)),
    ("grow", lambda t: np.all(np.diff(t[:, 2]) > 0)),
    ("shrink", lambda t: np.all(np.diff(t[:, 2]) < 0)),
    ("zigzag", lambda t: np.all(np.diff(t[:, 0]) > 0) and np.sum(np.diff(np.sign(np.diff(t[:, 1]))) != 0) >= 2),
    ("bounce", lambda t: np.ptp(t[:, 0]) < 1e-6 and np.ptp(t[:, 1]) > 0.2),
])
def test_trajectories_follow_the_motion(motion, check):
    clip = render(Scene("green", "square", "white", motion), seed=7)
    assert check(clip.trajectory)


def test_orbit_turns_clockwise_on_screen():
    t = render(Scene("red", "square", "grey", "orbit"), frames=16, seed=0).trajectory
    centre = t[:, :2].mean(axis=0)
    vectors = t[:, :2] - centre
    # z of the cross product of consecutive radius vectors: positive = clockwise with y pointing down.
    cross = vectors[:-1, 0] * vectors[1:, 1] - vectors[:-1, 1] * vectors[1:, 0]
    assert np.all(cross > 0)


def test_captions_round_trip_and_are_in_the_vocabulary():
    for scene in all_scenes():
        assert parse_caption(scene.caption) == scene
        assert set(scene.caption.split()) <= set(world_words())


def test_world_words_are_single_tokens():
    from motiondirector.backbones.tiny import build_tokenizer

    tokenizer = build_tokenizer(world_words(), 16)
    for word in world_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize(("prompt", "message"), [
    ("a purple square moving left on a grey background", "unknown word(s) purple"),
    ("a red square moving left on a background", "exactly one background"),
    ("a red blue square moving left on a grey background", "exactly one colour"),
    ("a red square on a grey background", "exactly one motion"),
])
def test_bad_captions_name_the_problem(prompt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_caption(prompt)


def test_probes_read_every_scene_of_the_world():
    for index, scene in enumerate(all_scenes()):
        clip = render(scene, seed=index)
        found = probes.probe(clip.frames)
        assert probes.appearance_hits(found, scene) == {"colour": True, "shape": True, "background": True}, scene
        assert np.allclose(found.trajectory[:, :2], clip.trajectory[:, :2], atol=0.01)
        fidelity = probes.motion_fidelity(found.trajectory, clip.trajectory)
        assert fidelity > 0.99, (scene, fidelity)


def test_probe_of_an_empty_video_finds_no_object():
    frames = np.full((4, 16, 16, 3), 0.5)
    found = probes.probe(frames)
    assert (found.colour, found.shape, found.background) == (probes.NONE, probes.NONE, "grey")
    assert np.isnan(found.trajectory).all()


def test_pearson_and_motion_fidelity_formulas():
    x = np.arange(8.0)
    assert probes.pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert probes.pearson(x, -x) == pytest.approx(-1.0)
    assert probes.pearson(x, np.ones(8)) == 0.0
    reference = np.stack([x / 10, np.full(8, 0.5), np.full(8, 0.1)], axis=1)  # only x moves
    shifted = np.stack([x / 10 + 0.2, np.sin(x), np.full(8, 0.3)], axis=1)
    assert probes.motion_fidelity(shifted, reference) == pytest.approx(1.0)  # translation-invariant, y skipped
    reversed_x = reference[::-1].copy()
    assert probes.motion_fidelity(reversed_x, reference) == pytest.approx(-1.0)
    half_missing = shifted.copy()
    half_missing[[1, 3, 5]] = np.nan
    assert probes.motion_fidelity(half_missing, reference) == pytest.approx(1.0)  # gaps interpolated
    assert probes.motion_fidelity(np.full((8, 3), np.nan), reference) == 0.0
    both = np.stack([x, x ** 2, np.full(8, 0.1)], axis=1)
    assert probes.motion_fidelity(np.stack([x, -(x ** 2), np.zeros(8)], axis=1), both) == pytest.approx(0.0)


def test_leakage_counts_only_attributes_the_prompt_changed():
    reference = Scene("red", "circle", "grey", "zigzag")
    clip = render(reference, seed=0)  # a video that is exactly the reference appearance
    found = probes.probe(clip.frames)
    hits = probes.leakage_hits(found, reference.replace(colour="blue", shape="square"), reference)
    assert hits == {"colour": True, "shape": True, "background": None, "any": True}
    other = probes.probe(render(Scene("blue", "square", "grey", "zigzag"), seed=0).frames)
    assert probes.leakage_hits(other, reference.replace(colour="blue", shape="square"), reference)["any"] is False
    assert probes.leakage_hits(found, reference, reference)["any"] is None


def test_mean_ci():
    mean, half = probes.mean_ci([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and half == pytest.approx(1.96 * np.std([1, 0, 1, 0], ddof=1) / 2)
    assert np.isnan(probes.mean_ci([None, float("nan")])[0])  # nothing counted
