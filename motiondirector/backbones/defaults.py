"""Model-aware defaults: the frames, size, fps and sampling settings a base model was made for.

A value the user does not set comes from here, so a bare `generate --base toy` renders the toy
model's 32×32×8 frames in 20 steps instead of a 384×384×16 picture it was never trained for.
Where they come from, first match wins:
1. `<model folder>/motiondirector.json` = {"defaults": {"frames": 8, "height": 32, ...}} (the
   embedded toy model ships one; any folder may add one);
2. the model cards of known hub models (KNOWN_MODELS);
3. the family: the UNet's native latent size × the VAE's downsampling factor, and the
   reference implementation's 16 frames at 8 fps, 30 DDIM steps, guidance 12 (method.md).
The LoRA training's timestep emphasis comes from the folder's scheduler in every case: a
zero-terminal-SNR base decides the motion at high timesteps, so half of the steps draw t ≥ 800
there (measured on the toy model, docs/toyworld.md); other bases keep the reference's uniform draw.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

DEFAULTS_FILE = "motiondirector.json"


@dataclass(frozen=True)
class ModelDefaults:
    frames: int
    height: int
    width: int
    fps: float
    steps: int
    guidance: float
    source: str = ""  # where the values came from (shown by `--json` outputs and recorded in sidecars)
    # Share of LoRA training steps drawing t from the high range (config `timesteps.high_share`).
    timestep_high_share: float = 0.0

    def values(self) -> dict[str, Any]:
        """The sampling and geometry values (what sidecars record)."""
        return {k: v for k, v in asdict(self).items() if k in _FIELDS}


# Model cards: ZeroScope v2 576w samples 576×320, 24 frames, 40 steps; ModelScope 1.7b samples at
# its native 256×256, 16 frames at 8 fps, 25 steps. Guidance: diffusers' TextToVideoSDPipeline default (9).
KNOWN_MODELS: dict[str, ModelDefaults] = {
    "cerspense/zeroscope_v2_576w": ModelDefaults(24, 320, 576, 8.0, 40, 9.0, "model card of cerspense/zeroscope_v2_576w"),
    "damo-vilab/text-to-video-ms-1.7b": ModelDefaults(16, 256, 256, 8.0, 25, 9.0,
                                                      "model card of damo-vilab/text-to-video-ms-1.7b"),
    "ali-vilab/text-to-video-ms-1.7b": ModelDefaults(16, 256, 256, 8.0, 25, 9.0,
                                                     "model card of ali-vilab/text-to-video-ms-1.7b"),
}
_FAMILY = dict(frames=16, fps=8.0, steps=30, guidance=12.0)
ZERO_SNR_HIGH_SHARE = 0.5
_FIELDS = ("frames", "height", "width", "fps", "steps", "guidance")


class ModelDefaultsError(ValueError):
    """A model folder's motiondirector.json is malformed."""


def _from_file(path: Path) -> ModelDefaults:
    try:
        document = json.loads(path.read_text())
        values = document["defaults"]
        missing = [name for name in _FIELDS if name not in values]
        unknown = sorted(set(values) - set(_FIELDS))
        if missing or unknown:
            raise ModelDefaultsError(f"{path}: defaults need exactly {', '.join(_FIELDS)}"
                                     + (f"; missing {', '.join(missing)}" if missing else "")
                                     + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        defaults = ModelDefaults(frames=int(values["frames"]), height=int(values["height"]),
                                 width=int(values["width"]), fps=float(values["fps"]), steps=int(values["steps"]),
                                 guidance=float(values["guidance"]), source=str(path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, ModelDefaultsError):
            raise
        raise ModelDefaultsError(f"{path}: expected {{\"defaults\": {{{', '.join(_FIELDS)}}}}} "
                                 f"({type(error).__name__}: {error})") from None
    if min(defaults.frames, defaults.height, defaults.width, defaults.steps) < 1 or defaults.fps <= 0:
        raise ModelDefaultsError(f"{path}: frames, height, width, steps and fps must be positive")
    return defaults


def family_defaults(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> ModelDefaults:
    factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample_size = unet_config.get("sample_size") or 48  # 48 × 8 = the reference's 384
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    return ModelDefaults(height=height * factor, width=width * factor, source="family default (UNet sample size)",
                         **_FAMILY)


def _sampling_defaults(model_id: str, folder: Path) -> ModelDefaults:
    own = folder / DEFAULTS_FILE
    if own.is_file():
        return _from_file(own)
    if model_id in KNOWN_MODELS:
        return KNOWN_MODELS[model_id]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae_path = folder / "vae" / "config.json"
    vae = json.loads(vae_path.read_text()) if vae_path.is_file() else {}
    return family_defaults(unet, vae)


def model_defaults(model_id: str, folder: Path) -> ModelDefaults:
    """The defaults of the model `model_id` whose diffusers folder is `folder` (see the module doc)."""
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text()) if scheduler_path.is_file() else {}
    high_share = ZERO_SNR_HIGH_SHARE if scheduler.get("rescale_betas_zero_snr") else 0.0
    return replace(_sampling_defaults(model_id, folder), timestep_high_share=high_share)

