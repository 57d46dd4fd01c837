"""What the command prints: aligned tables and colour for people on a terminal, JSON for machines.

Colour is used only when the stream is a terminal and ``NO_COLOR`` is not set. Results go to stdout;
progress and errors go to stderr, so stdout stays what a script captures (``--json``: one JSON document per
result, one per line for streams).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click


def _colour(stream: Any) -> bool:
    return "NO_COLOR" not in os.environ and bool(getattr(stream, "isatty", lambda: False)())


def text(data: bytes) -> str:
    """Stored bytes for display: UTF-8, with undecodable bytes escaped rather than lost."""
    return data.decode("utf-8", errors="backslashreplace")


class Output:
    """Results (stdout) as tables or JSON."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json

    def json(self, document: Any) -> None:
        """One JSON document on one line."""
        click.echo(json.dumps(document, ensure_ascii=False, separators=(",", ":")))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """Left-aligned columns under a bold header."""
        widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]
        head = "  ".join(header.upper().ljust(width) for header, width in zip(headers, widths, strict=True))
        click.echo(click.style(head.rstrip(), bold=True), color=_colour(sys.stdout))
        for row in rows:
            click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

    def line(self, message: str, *, fg: str | None = None) -> None:
        """One line of human output, coloured on a terminal."""
        click.echo(click.style(message, fg=fg), color=_colour(sys.stdout))


def note(message: str) -> None:
    """Progress for people, on stderr: ``coordkit: message``."""
    click.echo(f"coordkit: {message}", err=True)


def error(message: str) -> None:
    """A failure, on stderr, in red on a terminal."""
    click.echo(click.style(f"coordkit: error: {message}", fg="red"), err=True, color=_colour(sys.stderr))
