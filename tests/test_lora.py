"""LoRA targets (the paper's counts), named-adapter routing, scales, and fusing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from motiondirector.lora.inject import (
    LoraSettings,
    activate,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    fuse,
    load_adapter_weights,
    set_scale,
    unfuse,
)


def test_targets_cli_reports_paper_counts_for_default_config():
    result = subprocess.run([sys.executable, "-m", "motiondirector.cli", "targets", "--rank", "32", "--json"],
                            capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout)
    assert summary["spatial"]["modules"] == 96 and summary["spatial"]["params"] == 8_785_920
    assert summary["temporal"]["modules"] == 170 and summary["temporal"]["params"] == 12_472_320


def test_target_sets_follow_the_method(tiny_backbone):
    spatial, temporal = tiny_backbone.spatial_lora_targets(), tiny_backbone.temporal_lora_targets()
    assert spatial and temporal and not set(spatial) & set(temporal)
    assert all(".attentions." in n and ("attn1" in n or ".ff." in n) for n in spatial)
    assert not any("attn2" in n or "proj_in" in n or "proj_out" in n for n in spatial)
    assert all(n.startswith("transformer_in.") or ".temp_attentions." in n for n in temporal)
    assert any("attn2" in n for n in temporal)


def _randomize(model, name, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_parameters(model, name):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _predict(backbone, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 3, 16, 16, generator=generator)
    return backbone.predict(latents, torch.tensor([300]), backbone.encode_text(["a car"]))


@pytest.fixture()
def adapted(tiny_backbone):
    unet = tiny_backbone.unet
    settings = LoraSettings(rank=4, dropout=0.0)
    add_adapter(unet, "temporal", tiny_backbone.temporal_lora_targets(), settings, seed=0)
    add_adapter(unet, "spatial_0", tiny_backbone.spatial_lora_targets(), settings, seed=1)
    unet.eval()
    return tiny_backbone


def test_new_adapters_start_as_identity_and_inactive(adapted):
    base = _predict(adapted)
    activate(adapted.unet, ["temporal", "spatial_0"])
    torch.testing.assert_close(_predict(adapted), base)  # up = 0 at init
    a = adapter_state_dict(adapted.unet, "temporal")
    assert all(t.abs().sum() > 0 for k, t in a.items() if ".lora_A." in k)
    assert all(t.abs().sum() == 0 for k, t in a.items() if ".lora_B." in k)


def test_routing_selects_adapters_and_scale_zero_is_off(adapted):
    unet = adapted.unet
    _randomize(unet, "temporal", seed=2)
    base = _predict(adapted)
    activate(unet, ["temporal"])
    with_temporal = _predict(adapted)
    assert (with_temporal - base).abs().max() > 1e-4
    set_scale(unet, "temporal", 0.0)
    torch.testing.assert_close(_predict(adapted), base)
    activate(unet, [])
    set_scale(unet, "temporal", 1.0)
    torch.testing.assert_close(_predict(adapted), base)


def test_scale_is_linear_in_delta(adapted):
    unet = adapted.unet
    _randomize(unet, "temporal", seed=3)
    base = _predict(adapted)
    activate(unet, ["temporal"])
    full = _predict(adapted) - base
    set_scale(unet, "temporal", 0.5)
    half = _predict(adapted) - base
    # The UNet is nonlinear, so only check that half the scale moves the output less, in the same direction.
    assert torch.nn.functional.cosine_similarity(full.flatten(), half.flatten(), dim=0) > 0.9
    assert half.norm() < full.norm()


def test_fused_output_equals_injected_output(adapted):
    unet = adapted.unet
    _randomize(unet, "temporal", seed=4)
    _randomize(unet, "spatial_0", seed=5)
    activate(unet, ["temporal", "spatial_0"])
    set_scale(unet, "spatial_0", 0.7)
    injected = _predict(adapted)
    fuse(unet, ["temporal", "spatial_0"])
    fused = _predict(adapted)
    torch.testing.assert_close(fused, injected, atol=1e-5, rtol=1e-4)
    unfuse(unet)
    activate(unet, [])
    base_after = _predict(adapted)
    activate(unet, ["temporal", "spatial_0"])
    torch.testing.assert_close(_predict(adapted), injected, atol=1e-5, rtol=1e-4)
    assert (base_after - injected).abs().max() > 1e-4


def test_state_dict_round_trip_and_mismatch_errors(adapted, tiny_backbone):
    unet = adapted.unet
    _randomize(unet, "temporal", seed=6)
    state = adapter_state_dict(unet, "temporal")
    add_adapter(unet, "copy", adapted.temporal_lora_targets(), LoraSettings(rank=4, dropout=0.0))
    load_adapter_weights(unet, "copy", state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state_dict(unet, "copy").items())
    bad = dict(state)
    key = next(k for k in bad if ".lora_A." in k)
    bad[key] = torch.zeros(8, bad[key].shape[1])
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_weights(unet, "copy", bad)
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(unet, "copy", adapted.temporal_lora_targets(), LoraSettings(rank=4))
    with pytest.raises(ValueError, match="not found"):
        add_adapter(unet, "x", ["no.such.module"], LoraSettings(rank=4))


def test_lora_dropout_acts_on_the_branch_input_as_docs_training_md_says():
    """peft drops entries of x before A (the reference drops entries of B A x): under p = 0.5 an
    output-side dropout would zero about half of the update, an input-side one almost none of it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(16, 16))
    add_adapter(model, "a", ["proj"], LoraSettings(rank=4, alpha=4, dropout=0.5), seed=0)
    activate(model, ["a"])
    torch.nn.init.normal_(model.proj.lora_B["a"].weight)
    x = torch.randn(64, 16)
    base = model.proj.base_layer(x)
    model.eval()
    exact = model(x) - base
    model.train()
    noisy = model(x) - base
    assert (exact != 0).all()
    assert (noisy == 0).float().mean() < 0.01  # output-side dropout: ~0.5
    assert not torch.allclose(noisy, exact)
    # Input-side: the update equals B A (mask * x) / (1 - p) for one input mask per token.
    torch.manual_seed(1)
    noisy = model(x) - base
    torch.manual_seed(1)
    kept = torch.nn.functional.dropout(x, 0.5, training=True)
    a, b = model.proj.lora_A["a"].weight, model.proj.lora_B["a"].weight
    torch.testing.assert_close(noisy, kept @ a.T @ b.T)
