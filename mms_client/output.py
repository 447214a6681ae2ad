"""How the client prints results: readable tables by default, JSON for scripts (``-o json``)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Output(str, Enum):
    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table, or json for scripts")]

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def field(*names: str) -> Callable[[dict[str, Any]], Any]:
    """The first of ``names`` the record has (the API mixes camelCase and the seed's Pascal)."""

    def get(record: dict[str, Any]) -> Any:
        for name in names:
            value: Any = record
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                return value
        return None

    return get


def show(data: Any, output: Output, columns: Sequence[Column]) -> None:
    """One record (as field: value lines) or a list (as a table), or the service's JSON."""
    if output is Output.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    if isinstance(data, dict):
        table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for header, get in columns:
            table.add_row(header, _text(get(data)))
        out.print(table)
        return
    table = Table(show_edge=False, header_style="bold")
    for number, (header, _) in enumerate(columns):
        # The first column is the id a user copies into the next command: never broken.
        table.add_column(header, no_wrap=number == 0, overflow="fold")
    for record in data:
        table.add_row(*(_text(get(record)) for _, get in columns))
    out.print(table)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    text = str(value)
    if _TIMESTAMP.fullmatch(text):  # 2026-11-23T12:07:59.019581Z → 2026-11-23 12:07:59Z
        return f"{text[:10]} {text[11:19]}Z"
    return text


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
