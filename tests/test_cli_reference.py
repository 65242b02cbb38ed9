"""docs/CLI.md is what scripts/cli_reference.py makes of the parser, the same on any machine."""
from __future__ import annotations

import argparse
import difflib
import importlib.util
from pathlib import Path

import pytest

from distill.cli import make_parser

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
cli_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli_reference)


def test_docs_cli_md_is_the_generated_reference():
    expected = cli_reference.render(make_parser())
    written = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    if written != expected:
        diff = difflib.unified_diff(written.splitlines(), expected.splitlines(), "docs/CLI.md", "generated", lineterm="")
        pytest.fail(f"docs/CLI.md is stale; regenerate it with: {cli_reference.REGENERATE}\n"
                    + "\n".join(list(diff)[:60]), pytrace=False)


def test_every_flag_of_every_command_is_in_the_reference():
    parser = make_parser()
    text = cli_reference.render(parser)
    for name, _, sub in cli_reference._subcommands(parser):
        section = text.split(f"## `distill {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section or f" / {flag}`" in section, f"distill {name} {flag}"


def test_the_reference_does_not_depend_on_the_machine(monkeypatch, tmp_path):
    expected = cli_reference.render(make_parser())
    for name, value in {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
                        "DISTILL_CACHE": str(tmp_path / "cache"), "DISTILL_LOG_LEVEL": "DEBUG",
                        "COLUMNS": "37"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert cli_reference.render(make_parser()) == expected


def test_a_default_holding_a_path_of_this_machine_is_refused():
    parser = argparse.ArgumentParser(prog="distill")
    sub = parser.add_subparsers().add_parser("eval")
    sub.add_argument("--output-dir", default=argparse.SUPPRESS, help=f"where (default: {Path.home() / 'out'})")
    with pytest.raises(SystemExit, match="a path of this machine"):
        cli_reference.render(parser)
