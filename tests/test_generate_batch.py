"""generate_batch: several one-prompt requests with one LoRA set in one sampler call (what Serve batches)."""

from __future__ import annotations

import pytest
import torch
from test_package import write_random_package

from motiondirector import api


def params(base, prompt, seed, **extra):
    return api.GenerationParams(base=str(base), prompts=[prompt], seed=seed, steps=2, frames=4, height=32,
                                width=32, **extra)


def test_a_batch_equals_generate_per_item(tiny_model_dir, tiny_backbone, tmp_path):
    motion = api.LoraChoice(reference=str(write_random_package(tiny_backbone, tmp_path / "m", "temporal", seed=1)),
                            scale=0.7)
    items = [params(tiny_model_dir, f"prompt {i}", 10 + i, motions=[motion], negative_prompt="dark")
             for i in range(3)]
    recorder = api.Recorder()
    batch = api.generate_batch(items, backbone=tiny_backbone, observers=[recorder])
    singles = [api.generate(item, backbone=tiny_backbone)[0] for item in items]
    assert [video.seed for video in batch] == [10, 11, 12]
    for batched, single in zip(batch, singles, strict=True):
        # Batched kernels may round differently in the last bits; the videos are the same.
        torch.testing.assert_close(batched.frames, single.frames, atol=1e-4, rtol=0)
        assert batched.sidecar["params"] == single.sidecar["params"]
        assert batched.sidecar["loras"] == single.sidecar["loras"]
    # One sampler call for the three videos: one progress series of 2 steps.
    assert [(e.phase, e.done, e.total, e.label) for e in recorder.of(api.Progress)] == [
        ("sample", 1, 2, "3 videos"), ("sample", 2, 2, "3 videos")]
    # A batch of one is generate, bit for bit.
    [alone] = api.generate_batch(items[:1], backbone=tiny_backbone)
    assert torch.equal(alone.frames, singles[0].frames)


def test_items_that_differ_in_more_than_prompt_and_seed_are_refused(tiny_model_dir, tiny_backbone):
    first = params(tiny_model_dir, "a", 1)
    with pytest.raises(ValueError, match="batch item 1: differs from item 0"):
        api.generate_batch([first, params(tiny_model_dir, "b", 2, guidance=3.0)], backbone=tiny_backbone)
    two_prompts = first.model_copy(update={"prompts": ["a", "b"]})
    with pytest.raises(ValueError, match="batch item 0: one prompt per item"):
        api.generate_batch([two_prompts], backbone=tiny_backbone)
    assert api.generate_batch([], backbone=tiny_backbone) == []


def test_a_held_composition_gives_the_same_videos_and_closing_restores_the_model(tiny_model_dir, tiny_backbone,
                                                                                  tmp_path):
    from motiondirector.lora.inject import adapter_names

    motion = api.LoraChoice(reference=str(write_random_package(tiny_backbone, tmp_path / "m", "temporal", seed=2)))
    other = api.LoraChoice(reference=str(write_random_package(tiny_backbone, tmp_path / "o", "temporal", seed=3)))
    items = [params(tiny_model_dir, "a", 5, motions=[motion])]
    expected = api.generate_batch(items, backbone=tiny_backbone)[0]
    held = api.HeldComposition(tiny_backbone, items[0].choices())
    try:
        assert adapter_names(tiny_backbone.unet) == {"motion_0"}
        for _ in range(2):  # the set stays applied between batches
            video = api.generate_batch(items, backbone=tiny_backbone, composition=held)[0]
            assert torch.equal(video.frames, expected.frames)
        with pytest.raises(ValueError, match="not the items' LoRA set"):
            api.generate_batch([params(tiny_model_dir, "a", 5, motions=[other])], backbone=tiny_backbone,
                               composition=held)
    finally:
        held.close()
    assert adapter_names(tiny_backbone.unet) == set()
