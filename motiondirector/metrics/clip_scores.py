"""The paper's automatic metrics (Tables 1-2), in the paper's units.

- CLIP text-frame score ("appearance diversity" / text alignment): mean over frames of
  logit_scale · cos(text, frame); for OpenAI CLIP logit_scale is 100, i.e. 100 · cos.
- Temporal consistency: mean over consecutive frame pairs of 100 · cos(frame_i, frame_i+1);
  identical frames give 100.
- PickScore: the text-frame score computed with the PickScore model (a CLIP-architecture model,
  its own weights and logit scale), averaged over frames.

Models are transformers `CLIPModel`s with their processor, from a local folder or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from motiondirector.backbones.base import ModelNotAvailableError
from motiondirector.storage import local_path

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
# PickScore's repository has no processor; its authors use this one.
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_FRAME_BATCH = 16


def _from_pretrained(loader, name: str, what: str):
    """Local folder or hub id; the hub only when it is not cached, and a clear error when offline."""
    if local_path(name).is_dir():
        return loader.from_pretrained(str(local_path(name)))
    try:
        return loader.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    try:
        return loader.from_pretrained(name)
    except OSError as error:
        raise ModelNotAvailableError(
            f"{what} {name!r} is not available: not a local folder, not in the Hugging Face cache, and it could "
            f"not be downloaded ({type(error).__name__}). Download it on a machine with internet "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass DIR") from None


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipScorer:
    """A CLIP-architecture model with its processor: normalized text and frame embeddings."""

    name: str
    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPProcessor
    device: torch.device

    @classmethod
    def load(cls, model: str, processor: str | None = None, device: str | torch.device = "cpu") -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        device = torch.device(device)
        clip = _from_pretrained(CLIPModel, model, "CLIP model").to(device).eval().requires_grad_(False)
        return cls(model, clip, _from_pretrained(CLIPProcessor, processor or model, "CLIP processor"), device)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        output = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                              attention_mask=tokens.attention_mask.to(self.device))
        return F.normalize(_pooled(output).float(), dim=-1)

    @torch.no_grad()
    def frame_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, D) unit vectors."""
        embeddings = []
        for start in range(0, len(frames), _FRAME_BATCH):
            pixels = self.processor.image_processor(images=list(frames[start:start + _FRAME_BATCH]),
                                                    return_tensors="pt").pixel_values
            output = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            embeddings.append(F.normalize(_pooled(output).float(), dim=-1))
        return torch.cat(embeddings)


def text_frame_score(scorer: ClipScorer, prompt: str, frames: np.ndarray) -> float:
    """Mean over frames of logit_scale · cos(prompt, frame) (CLIP score; PickScore with its model)."""
    text = scorer.text_embeddings([prompt])
    return float((scorer.frame_embeddings(frames) @ text.T).mean() * scorer.logit_scale)


def temporal_consistency(scorer: ClipScorer, frames: np.ndarray) -> float:
    """Mean of 100 · cos(frame_i, frame_i+1) over consecutive frames."""
    if len(frames) < 2:
        raise ValueError(f"temporal consistency needs at least 2 frames, got {len(frames)}")
    embeddings = scorer.frame_embeddings(frames)
    return float((embeddings[:-1] * embeddings[1:]).sum(-1).mean() * 100.0)


def video_metrics(frames: np.ndarray, prompt: str | None, clip: ClipScorer,
                  pickscore: ClipScorer | None = None) -> dict[str, float | None]:
    """All metrics of one video; text scores are None without a prompt."""
    return {
        "clip_text_score": text_frame_score(clip, prompt, frames) if prompt else None,
        "temporal_consistency": temporal_consistency(clip, frames),
        "pickscore": text_frame_score(pickscore, prompt, frames) if prompt and pickscore else None,
    }
