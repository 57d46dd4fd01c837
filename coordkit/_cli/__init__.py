"""The ``coordkit`` command line: the recipes for programs that cannot be changed, wrapped from the shell."""

from __future__ import annotations

from . import _commands as _commands, _cron as _cron  # register the subcommands on the group
from ._app import cli as cli


def main() -> None:
    """The console script's entry point."""
    cli(prog_name="coordkit")
