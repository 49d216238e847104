"""The `motiondirector` command line. Each area registers its commands from motiondirector/commands/.

Heavy imports (torch, diffusers, Ray) happen inside the commands, so `--help` stays fast and
`motiondirector/` itself never imports Ray: Ray-based commands import `pipelines`/`serve` lazily.
"""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="MotionDirector: customize the motion of text-to-video diffusion models.")



@app.callback()
def _root() -> None:
    """MotionDirector: customize the motion of text-to-video diffusion models."""


_COMMAND_MODULES = ("targets", "generate", "lora", "evaluate", "animate", "cache", "toyworld", "demo", "catalog",
                    "ingest", "train", "train_batch", "serve")

for _name in _COMMAND_MODULES:
    importlib.import_module(f"motiondirector.commands.{_name}").register(app)


def main() -> None:
    # Our own rich bars show progress; hub/transformers per-file bars ("Loading weights") are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()
if __name__ == "__main__":
    main()
