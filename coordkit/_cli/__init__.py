"""The ``coordkit`` command line: the recipes for programs that cannot be changed, wrapped from the shell.

It needs the ``cli`` extra (click, and the etcd client): ``pip install 'coordkit[cli]'``. Without it, the
``coordkit`` script says so and exits with 1.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

#: What the script prints when click is not installed.
MISSING_EXTRA = "coordkit: the command line needs the 'cli' extra: pip install 'coordkit[cli]'\n"


def load() -> click.Group:
    """The ``coordkit`` click group with every subcommand registered (needs click)."""
    from . import _commands as _commands, _cron as _cron, _queue as _queue  # register the subcommands
    from ._app import cli

    return cli


def main() -> None:
    """The console script's entry point."""
    try:
        import click as _click  # noqa: F401  (only to know whether the extra is installed)
    except ImportError:
        sys.stderr.write(MISSING_EXTRA)
        sys.exit(1)
    load()(prog_name="coordkit")
