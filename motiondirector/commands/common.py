"""Conventions shared by every CLI command: options, exit codes, JSON output, error reporting."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Annotated, Any

import typer
from rich.console import Console

# stdout carries results (and `--json`); progress and messages go to stderr.
console = Console(stderr=True)


class ExitCode(IntEnum):
    """Documented in docs/cli.md. 2 is also what typer returns for a malformed command line."""

    OK = 0
    FAILED = 1  # the command ran and failed (e.g. `catalog verify` found corrupted files)
    BAD_INPUT = 2  # bad arguments, config, data file or package: the message names it
    MODEL_UNAVAILABLE = 3  # base model not found / not downloadable / does not fit the device
    INTERRUPTED = 130  # SIGINT/SIGTERM (training wrote a checkpoint first)


BaseOption = Annotated[str, typer.Option("--base", help="Base model: 'toy', a diffusers folder or a hub id.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
CatalogOption = Annotated[str | None, typer.Option(
    "--catalog", help="Catalog root (fsspec URI); default $MOTIONDIRECTOR_CATALOG or ~/.cache/motiondirector/catalog.")]


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(int(code))


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the library's expected errors into one clear line and a documented exit code."""
    # api loads only the modules of the names asked for: the fast catalog commands stay fast.
    from motiondirector.api import ModelNotAvailableError, ModelTooLargeError, TrainingDiverged

    try:
        yield
    except (ModelNotAvailableError, ModelTooLargeError) as error:
        raise fail(str(error), ExitCode.MODEL_UNAVAILABLE) from None
    except TrainingDiverged as error:
        raise fail(str(error), ExitCode.FAILED) from None
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error), ExitCode.BAD_INPUT) from None
    except KeyboardInterrupt:
        raise fail("interrupted", ExitCode.INTERRUPTED) from None
