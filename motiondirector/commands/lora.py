"""`motiondirector lora ...`: inspect packages, import reference/kohya files, export kohya or merged models."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from motiondirector.commands.common import JsonOption, console, print_json, reported_errors

lora_app = typer.Typer(no_args_is_help=True, help="Inspect, import and export LoRA packages.")


class Kind(StrEnum):
    spatial = "spatial"
    temporal = "temporal"


class ExportFormat(StrEnum):
    merged = "merged"
    kohya = "kohya"


KindOption = Annotated[Kind, typer.Option("--kind", help="temporal (motion) or spatial (appearance).")]
RequiredBase = Annotated[str, typer.Option("--base", help="Base model the LoRA belongs to: 'toy', a diffusers "
                                                          "folder or a hub id.")]
OutDir = Annotated[Path, typer.Option("--out", help="Package folder to write.")]
CpuDevice = Annotated[str, typer.Option("--device", help="Where to load the base (only its shapes are needed).")]


def _report(paths: list[Path], as_json: bool) -> None:
    if as_json:
        print_json({"written": [str(p) for p in paths]})
    else:
        for path in paths:
            console.print(f"wrote {path}", highlight=False)


@lora_app.command("info")
def info(package: Annotated[Path, typer.Argument(help="Package folder.")], as_json: JsonOption = False) -> None:
    """Summary of a package's manifest (kind, base, rank, size, training, catalog fields)."""
    from motiondirector.api import read_package

    with reported_errors():
        manifest, state = read_package(package)
    summary = manifest.model_dump(mode="json")
    summary["parameters"] = sum(t.numel() for t in state.values())
    summary["modules"] = len(manifest.targets)
    if as_json:
        print_json(summary)
        return
    table = Table(title=str(package), show_header=False)
    rows = [("kind", manifest.kind), ("base", f"{manifest.base.model_id} ({manifest.base.architecture})"),
            ("rank / alpha", f"{manifest.rank} / {manifest.alpha:g}"),
            ("modules / parameters", f"{len(manifest.targets)} / {summary['parameters']:,}"),
            ("mode", manifest.mode), ("step", str(manifest.step)),
            ("losses", ", ".join(f"{k} {v:.4g}" for k, v in manifest.losses.items()) or "-"),
            ("captions", "; ".join(manifest.captions) or "-"), ("created", str(manifest.created_at)),
            ("catalog id / name", f"{manifest.id or '-'} / {manifest.name or '-'}"),
            ("tags", ", ".join(manifest.tags) or "-")]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@lora_app.command("import-reference")
def import_reference(
    file: Annotated[Path, typer.Argument(help="The reference implementation's <step>_unet.pt file.")],
    kind: KindOption,
    base: RequiredBase,
    out: OutDir,
    index: Annotated[int | None, typer.Option("--index", min=0, help="Spatial files with N LoRAs (one per "
                                              "training clip): import LoRA K only. Default: all, as OUT/0..N-1.")]
    = None,
    device: CpuDevice = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Convert a reference-implementation LoRA file (key-less tensor list) into package(s)."""
    from motiondirector.api import import_reference as convert
    from motiondirector.api import load_backbone

    with reported_errors():
        paths = convert(file, kind.value, load_backbone(base, device), out, index=index)
    _report(paths, as_json)


@lora_app.command("import")
def import_kohya(
    file: Annotated[Path, typer.Argument(help="kohya-scheme .safetensors file (lora_unet_... keys).")],
    kind: KindOption,
    base: RequiredBase,
    out: OutDir,
    device: CpuDevice = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Convert a kohya/ComfyUI-style LoRA file into a package."""
    from motiondirector.api import import_kohya as convert
    from motiondirector.api import load_backbone

    with reported_errors():
        path = convert(file, kind.value, load_backbone(base, device), out)
    _report([path], as_json)


@lora_app.command("export")
def export(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    out: Annotated[Path, typer.Option("--out", help="merged: model folder to create; kohya: FILE.safetensors "
                                                    "(or a folder to put <package>.safetensors in).")],
    export_format: Annotated[ExportFormat, typer.Option("--format", help="kohya: one lora_unet_* safetensors "
                                                        "file; merged: a diffusers folder with the LoRA fused.")],
    base: Annotated[str | None, typer.Option("--base", help="merged: the base model to fuse into.")] = None,
    scale: Annotated[float, typer.Option("--scale", help="merged: γ of the fused LoRA.")] = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Export a package as a kohya-scheme file, or as a diffusers model folder with the LoRA fused in."""
    from motiondirector.api import export_kohya, export_merged
    from motiondirector.commands.common import fail

    with reported_errors():
        if export_format is ExportFormat.merged:
            if base is None:
                raise fail("--format merged needs --base MODEL (the model to fuse the LoRA into)")
            path = export_merged([(package, scale)], base, out)
        else:
            target = out if out.suffix == ".safetensors" else out / f"{package.resolve().name}.safetensors"
            path = export_kohya(package, target)
    _report([path], as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(lora_app, name="lora")
