"""`motiondirector serve` options and settings errors (no Ray started: these fail before it)."""

from __future__ import annotations

from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.commands.common import ExitCode


def test_serve_is_a_command_with_the_documented_options():
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--base", "--catalog", "--port", "--host", "--device"):
        assert option in result.output


def test_bad_settings_exit_2_naming_the_file_and_key(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("base: toy\nqueue_limit: 0\ncolour: red\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == ExitCode.BAD_INPUT
    said = " ".join(result.output.split())
    assert str(config) in said and "queue_limit" in said and "colour" in said
    missing = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == ExitCode.BAD_INPUT and "no such config file" in missing.output


def test_build_app_takes_string_args_as_serve_run_passes_them(tmp_path):
    from serve.app import build_app, settings_from_args

    config = tmp_path / "serve.yaml"
    config.write_text("base: toy\nmax_batch_size: 4\nport: 9000\n")
    args = {"config": str(config), "port": "9001", "limits": '{"max_frames": 16}'}
    settings = settings_from_args(args)
    assert (settings.base, settings.max_batch_size, settings.port, settings.limits.max_frames) == ("toy", 4, 9001, 16)
    assert type(build_app(args)).__name__ == "Application"
