"""Offline builder of small random-init model folders with the real ModelScope/ZeroScope architecture.

Tests use it instead of downloads; the toy world starts its pretraining from it. The folder has the
exact diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json), so it
loads through the same code path as ZeroScope, and diffusers' own pipelines can read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Words every tiny tokenizer knows as single tokens; anything else falls back to characters.
BASIC_WORDS = ("a", "an", "the", "on", "in", "of", "is", "car", "running", "road", "person", "riding",
               "bicycle", "moving", "video", "red", "blue", "green", "dog", "cat")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of a small model of the real architecture (defaults: ~1 M-parameter UNet for tests)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    sample_size: int = 32
    words: tuple[str, ...] = field(default=BASIC_WORDS)
    # The noise schedule: ModelScope's by default; ("v_prediction", True, "trailing") is a zero-terminal-SNR
    # base (Lin et al. 2024), the kind the library must sample, train and invert alike.
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"


def build_tokenizer(words: tuple[str, ...], max_tokens: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make each of `words` one token (a word-level vocabulary).

    The merges are learnt by BPE itself on the word list (most frequent pair first, merged in every
    word), so encoding a listed word replays exactly its own merges; hand-made per-word merge chains
    break when one word's merge outranks another's (e.g. "re" of "red" splitting "green").
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _ALPHABET:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    pieces = [list(word[:-1]) + [word[-1] + "</w>"] for word in dict.fromkeys(w.lower() for w in words)]
    merges: list[tuple[str, str]] = []
    while any(len(word) > 1 for word in pieces):
        counts: dict[tuple[str, str], int] = {}
        for word in pieces:
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda pair: (counts[pair], pair))  # ties broken by the pair itself: deterministic
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        pieces = [_merge_pair(word, best) for word in pieces]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each non-overlapping occurrence of `pair`, scanning left to right (as BPE encoding does)."""
    merged, index = [], 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(word[index] + word[index + 1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return merged


def build_components(config: TinyModelConfig, seed: int = 0) -> dict[str, object]:
    """Random-init unet, vae, text encoder, tokenizer and scheduler (deterministic in `seed`)."""
    torch.manual_seed(seed)
    channels = config.block_out_channels
    unet = UNet3DConditionModel(
        sample_size=config.sample_size // 2 ** (len(config.vae_channels) - 1),
        block_out_channels=channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("CrossAttnDownBlock3D",) * (len(channels) - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (len(channels) - 1),
        cross_attention_dim=config.text_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=min(config.norm_num_groups, config.vae_channels[0]),
        sample_size=config.sample_size,
    )
    tokenizer = build_tokenizer(config.words, config.max_tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_dim,
        intermediate_size=config.text_dim * 4,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ))
    # ModelScope's scheduler settings (scaled-linear betas, epsilon prediction) unless the config says otherwise.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=config.prediction_type,
                              rescale_betas_zero_snr=config.zero_terminal_snr,
                              timestep_spacing=config.timestep_spacing)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def save_model_folder(components: dict[str, object], folder: str | Path, *, recipe: dict | None = None) -> Path:
    """Write components as a diffusers folder readable by diffusers' TextToVideoSDPipeline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, component in components.items():
        component.save_pretrained(folder / name)
    model_index = {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    if recipe is not None:
        (folder / "recipe.json").write_text(json.dumps(recipe, indent=2, default=list))
    return folder


def write_tiny_model(folder: str | Path, config: TinyModelConfig | None = None, seed: int = 0) -> Path:
    """Build and save a random-init tiny model; returns the folder (usable as `--base`)."""
    config = config or TinyModelConfig()
    return save_model_folder(build_components(config, seed), folder,
                             recipe={"builder": "tiny", "seed": seed, **asdict(config)})
