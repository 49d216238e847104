"""Image animation: learn the appearance of images as a spatial LoRA, move it with a learned motion.

The reference's single-image recipe (method.md): spatial LoRA only (temporal training is off for
images), one LoRA for all images, random horizontal flips. The LoRA is cached under the cache root
by the images' content hashes and every training setting, so animating the same images again
trains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import fingerprint
from motiondirector.events import Observer
from motiondirector.generate import GeneratedVideo, GenerationParams, LoraChoice, generate
from motiondirector.storage import cache_root, local_path, staged_folder
from motiondirector.train.resolve import LoraCatalog

# Single-frame steps need little activation memory, so no gradient checkpointing (its recompute
# would also run outside the spatial path's temporal bypass).
IMAGE_TRAINING = {"mode": "spatial_only", "spatial_lora": "shared", "optimizer": {"weight_decay": 1e-4},
                  "checkpoint_every": 0, "validation": {"every": 0}, "gradient_checkpointing": False}
IMAGE_HFLIP = 0.5
ANIMATE_FOLDER = "animate"


def image_appearance(images: list[str | Path], caption: str, backbone: BackboneSpec, *, steps: int = 300,
                     size: tuple[int, int] | None = None, seed: int = 0, rank: int = 32,
                     cache_dir: str | Path | None = None, observers: Sequence[Observer] = ()) -> Path:
    """A spatial LoRA trained on `images` (each repeated as a clip), cached under the cache root by the
    images' content hashes and every training setting; returns its package folder. `size`: (height,
    width) of the training frames, default the base model's."""
    from motiondirector.config import validate_config
    from motiondirector.data.video import content_hash
    from motiondirector.train.layout import RunLayout
    from motiondirector.train.loop import train

    if not images:
        raise ValueError("animate needs at least one image")
    sources = [str(local_path(image).resolve()) for image in images]
    size = size or (backbone.defaults.height, backbone.defaults.width)
    config = validate_config({
        **IMAGE_TRAINING, "base": backbone.model_id, "device": str(backbone.device), "seed": seed, "steps": steps,
        "lora": {"rank": rank}, "cache_dir": str(cache_dir) if cache_dir else None,
        # One frame per clip: the spatial path trains on single frames, and images do not move.
        "data": {"name": "animate", "sources": sources, "kind": "image", "caption": caption,
                 "caption_source": "fixed", "frames": 1, "size": list(size), "hflip": IMAGE_HFLIP},
    }, "animate settings")
    recipe = config.model_dump(mode="json")
    for machine_specific in ("device", "cache_dir"):
        recipe.pop(machine_specific)
    recipe["data"].pop("sources")  # the images enter the key by content, not by path
    key = fingerprint("animate", sorted(content_hash(s) for s in sources), backbone.architecture_fingerprint,
                      recipe)
    root = cache_root(cache_dir) / ANIMATE_FOLDER
    run = RunLayout(root / key)
    if not (run.summary.is_file() and (run.spatial(0) / "manifest.json").is_file()):
        with staged_folder(run.root) as staging:  # another process finishing it first wins
            train(config, staging, backbone=backbone, observers=observers)
    return run.spatial(0)


def animate(images: list[str | Path], params: GenerationParams, *, caption: str | None = None,
            steps_train: int = 300, appearance_scale: float = 1.0, backbone: BackboneSpec | None = None,
            device: str | torch.device | None = None, catalog: LoraCatalog | None = None,
            cache_dir: str | Path | None = None, observers: Sequence[Observer] = ()) -> list[GeneratedVideo]:
    """Animate images: their appearance (a cached spatial LoRA) with `params.motions`, then `generate`
    (in memory, like `generate`; `save_video` writes the files)."""
    if not params.motions:
        raise ValueError("animate needs a motion: --motion LORA")
    if backbone is None:
        from motiondirector.backbones import load_backbone

        backbone = load_backbone(params.base, device)
    params = params.with_defaults(backbone.defaults)
    package = image_appearance(images, caption or params.prompts[0], backbone, steps=steps_train,
                               size=(params.height, params.width), cache_dir=cache_dir, observers=observers)
    appearance = LoraChoice(reference=str(package), scale=appearance_scale)
    params = params.model_copy(update={"appearances": [*params.appearances, appearance]})
    return generate(params, backbone=backbone, catalog=catalog, cache_dir=cache_dir, observers=observers)
