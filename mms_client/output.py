"""How the client prints results, as `az` does: ``-o json|jsonc|table|tsv|yaml|none`` (default
``table``, or ``MMS_OUTPUT``), after ``--query`` (a JMESPath expression) picked what to print.

A table fits the terminal: the first column (the id a user copies into the next command) is
never cut; the others are cut with an ellipsis, and the last ones left out when even that does
not fit, so a name is never wrapped letter by letter at 80 columns.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Annotated, Any

import jmespath
import typer
import yaml
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from mms_client.api import CliError
from mms_client.consoles import err, out  # noqa: F401 - err: the commands import it from here

OUTPUT_ENV = "MMS_OUTPUT"
GLOBAL_PANEL = "Global Arguments"


class Output(str, Enum):
    json = "json"
    jsonc = "jsonc"
    table = "table"
    tsv = "tsv"
    yaml = "yaml"
    none = "none"


def _compile_query(text: str) -> ParsedResult:
    try:
        return jmespath.compile(text)
    except JMESPathError as exc:
        # A usage error (exit code 2) naming what is wrong, as az's --query does.
        raise typer.BadParameter(f"not a JMESPath expression: {' '.join(str(exc).split())}") from None


OutputOption = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        envvar=OUTPUT_ENV,
        show_envvar=True,
        help="json, jsonc (colored), table, tsv, yaml or none",
        rich_help_panel=GLOBAL_PANEL,
    ),
]
QueryOption = Annotated[
    ParsedResult | None,
    typer.Option(
        "--query",
        parser=_compile_query,
        metavar="JMESPATH",
        help='a JMESPath expression applied to the result before it is printed, e.g. "[].{id: id, name: name}"',
        rich_help_panel=GLOBAL_PANEL,
        show_default=False,
    ),
]

Column = tuple[str, Callable[[dict[str, Any]], Any]]

# In a table too wide for the terminal, a column after the id and the name keeps at least this
# many characters (or its header's) before the columns after it are left out.
MIN_COLUMN_WIDTH = 10
MAX_NAME_WIDTH = 40
_GAP = 2  # between two columns


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


def show(data: Any, output: Output, columns: Sequence[Column], query: ParsedResult | None = None) -> None:
    """The result as ``output`` asks; ``columns`` make the table unless a query reshaped it."""
    if query is not None:
        try:
            data = query.search(data)
        except JMESPathError as exc:
            raise CliError(f"--query: {' '.join(str(exc).split())}", exit_code=2) from None
        columns = _columns_of(data)
    if output is Output.none:
        return
    if output is Output.json or (output is Output.jsonc and not out.is_terminal):
        sys.stdout.write(_json(data) + "\n")
    elif output is Output.jsonc:
        out.print_json(_json(data), indent=2, sort_keys=True)
    elif output is Output.yaml:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False))
    elif output is Output.tsv:
        sys.stdout.write(tsv(data))
    elif isinstance(data, dict):
        out.print(_record_table(data, columns))
    elif isinstance(data, list):
        out.print(_list_table(data, columns, out.width))
    elif data is not None:
        out.print(_text(data), markup=False, highlight=False)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def tsv(data: Any) -> str:
    """az's tsv: a row per item of a list (a single result is one row), no header; a record's
    values in the order of its sorted keys; within a row, a nested list is its length, a
    nested record is empty, null is empty, a boolean is true or false."""
    rows = data if isinstance(data, list) else [data]
    return "".join("\t".join(_tsv_cell(v) for v in _tsv_values(row)) + "\n" for row in rows)


def _tsv_values(row: Any) -> list[Any]:
    if isinstance(row, dict):
        return [value for _, value in sorted(row.items())]
    if isinstance(row, list):
        return row
    return [row]


def _tsv_cell(value: Any) -> str:
    if isinstance(value, list):
        return str(len(value))
    if isinstance(value, dict) or value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _columns_of(data: Any) -> list[Column]:
    """A query's result as a table: its records' keys, in the order they first appear (az
    names a query's columns by its keys too); a list of values is one column."""
    records = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    keys: dict[str, None] = {}
    for record in records:
        if isinstance(record, dict):
            keys.update(dict.fromkeys(record))
    if records and not keys:
        return [("Result", lambda value: value)]
    return [(key, field(key)) for key in keys]


def _record_table(record: dict[str, Any], columns: Sequence[Column]) -> Table:
    table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for header, get in columns:
        table.add_row(header, _text(get(record)))
    return table


def _list_table(records: list[Any], columns: Sequence[Column], width: int) -> Table:
    """The records as rows in ``width``: the id and the name whole (a name cut at 40), the
    other columns cut with an ellipsis down to 10 characters, and the last of them left out
    while even that does not fit (then the name is cut too); room to spare goes to the
    columns in their order."""
    rows = [[_text(get(record)) for _, get in columns] for record in records]
    natural = [max([cell_len(header), *(cell_len(row[i]) for row in rows)]) for i, (header, _) in enumerate(columns)]
    least = [
        n if i == 0 else min(n, MAX_NAME_WIDTH if i == 1 else max(cell_len(h), MIN_COLUMN_WIDTH))
        for i, (n, (h, _)) in enumerate(zip(natural, columns))
    ]
    kept = _fitting(least, width)
    if kept == 1 < len(columns):  # too narrow even for the whole name: cut it too
        least[1] = min(natural[1], max(cell_len(columns[1][0]), MIN_COLUMN_WIDTH))
        kept = _fitting(least, width)
    widths = least[:kept]
    spare = width - sum(widths) - _GAP * (kept - 1)
    for i in range(kept):
        grow = min(natural[i] - widths[i], max(spare, 0))
        widths[i] += grow
        spare -= grow
    # As az's: no rules between the columns, a line under the headers.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for (header, _), column_width in zip(columns[:kept], widths):
        table.add_column(header, no_wrap=True, overflow="ellipsis", width=column_width)
    for row in rows:
        table.add_row(*row[:kept])
    return table


def _fitting(widths: list[int], width: int) -> int:
    """How many of the first columns of ``widths`` fit in ``width`` (one at least)."""
    kept = len(widths)
    while kept > 1 and sum(widths[:kept]) + _GAP * (kept - 1) > width:
        kept -= 1
    return kept


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    text = str(value)
    if _TIMESTAMP.fullmatch(text):  # 2026-11-23T12:07:59.019581Z → 2026-11-23 12:07:59Z
        return f"{text[:10]} {text[11:19]}Z"
    return text


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")


def printer(console: Console) -> Callable[[str], None]:
    """Writes text to ``console`` as it is (a build log: no markup, no highlighting)."""
    return lambda text: console.print(text, end="", markup=False, highlight=False)
