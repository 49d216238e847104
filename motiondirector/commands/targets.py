"""`motiondirector targets`: which modules get LoRAs, and how many parameters that is."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from motiondirector.commands.common import DeviceOption, JsonOption, console, print_json, reported_errors


def targets(
    base: Annotated[str | None, typer.Option("--base", help="Model to inspect; default: the default "
                                             "UNet3DConditionModel config on the meta device.")] = None,
    rank: Annotated[int, typer.Option("--rank", min=1)] = 32,
    device: DeviceOption = "cpu",
    as_json: JsonOption = False,
) -> None:
    """List spatial and temporal LoRA targets with module and parameter counts."""
    from motiondirector.api import target_summary

    with reported_errors():
        if base is None:
            import torch
            from diffusers import UNet3DConditionModel

            from motiondirector.api import lora_targets

            with torch.device("meta"):
                unet = UNet3DConditionModel()
            spatial, temporal = lora_targets(unet, "spatial"), lora_targets(unet, "temporal")
        else:
            from motiondirector.api import load_backbone

            backbone = load_backbone(base, device)
            unet = backbone.unet
            spatial, temporal = backbone.spatial_lora_targets(), backbone.temporal_lora_targets()
        summary = target_summary(unet, spatial, temporal, rank)
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"LoRA targets at rank {rank}")
    for column in ("kind", "modules", "params", "example"):
        table.add_column(column)
    for kind, info in summary.items():
        table.add_row(kind, str(info["modules"]), f"{info['params']:,}", info["targets"][0] if info["targets"] else "")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("targets")(targets)
