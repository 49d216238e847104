"""`motiondirector serve`: the generation API and the catalog web page on a local Ray cluster (docs/serve.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from motiondirector.commands.common import CatalogOption, ExitCode, console, fail

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML settings file (docs/serve.md); flags win.")]
BaseOption = Annotated[str | None, typer.Option("--base", help="Base model: 'toy' (default), a diffusers folder "
                                                            "or a hub id.")]
PortOption = Annotated[int | None, typer.Option("--port", min=1, max=65535, help="HTTP port (default 8000).")]
HostOption = Annotated[str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]


def serve_command(config: ConfigOption = None, base: BaseOption = None, catalog: CatalogOption = None,
                  port: PortOption = None, host: HostOption = None, device: DeviceOption = None) -> None:
    """Serve the generation API (/v1, OpenAPI at /docs) and the catalog web page (/) until Ctrl-C."""
    from serve.settings import load_settings  # no Ray yet: bad settings fail fast

    try:
        settings = load_settings(config, base=base, catalog=catalog, port=port, host=host, device=device)
    except ValueError as error:
        raise fail(str(error)) from None

    from serve.run import AppDidNotStart, running

    try:
        with running(settings) as url:
            console.print(f"serving {settings.base} at {url}/ (API docs: {url}/docs); Ctrl-C stops", highlight=False)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.print("stopping", highlight=False)
    except KeyboardInterrupt:  # while the app was still starting (after that, Ctrl-C is the normal stop)
        raise fail("interrupted while starting", ExitCode.INTERRUPTED) from None
    except AppDidNotStart as error:
        raise fail(f"the application did not start: {error}",
                   ExitCode.MODEL_UNAVAILABLE if error.model_unavailable else ExitCode.FAILED) from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
