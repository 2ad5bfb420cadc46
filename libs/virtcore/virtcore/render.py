"""Output for the CLIs: rows of plain data as a table, JSON or YAML on stdout.

A table is drawn with rich on a terminal and as plain aligned text otherwise (pipes, logs,
tests). JSON and YAML print the rows' full data, keys in the order the rows give them, so the
keys stay stable for scripts; the table shows only the chosen columns.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

FORMATS = ("table", "json", "yaml")


@dataclass(frozen=True)
class Column:
    key: str  # key in each row
    header: str
    # Cell text from the whole row (for cells that combine fields); default: cell(row[key]).
    text: Optional[Callable[[Mapping[str, Any]], str]] = None


def cell(value: Any) -> str:
    """Table text of one value: "-" for None, yes/no for booleans, lists comma-separated."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value) or "-"
    return str(value)


def plain(data: Any) -> Any:
    """Dataclasses, tuples and mappings turned into JSON/YAML-safe dicts, lists and scalars."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    if isinstance(data, Mapping):
        return {str(k): plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple, set, frozenset)):
        items = sorted(data) if isinstance(data, (set, frozenset)) else data
        return [plain(v) for v in items]
    return data


def dump(data: Any, fmt: str) -> str:
    """`data` as JSON or YAML text (ending in a newline)."""
    data = plain(data)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    raise ValueError(f"unknown data format {fmt!r}, expected json or yaml")


def table_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Plain aligned table: upper-case headers, two spaces between columns."""
    grid = [[c.header.upper() for c in columns]]
    for row in rows:
        grid.append([c.text(row) if c.text else cell(row.get(c.key)) for c in columns])
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in grid]
    return "\n".join(lines) + "\n"


def _rich_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    out: TextIO,
    title: Optional[str],
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for c in columns:
        table.add_column(c.header.upper(), overflow="fold")
    for row in rows:
        table.add_row(*(c.text(row) if c.text else cell(row.get(c.key)) for c in columns))
    Console(file=out).print(table)


def render(
    rows: Sequence[Any],
    columns: Sequence[Column],
    fmt: str,
    *,
    out: Optional[TextIO] = None,
    title: Optional[str] = None,
    rich: Optional[bool] = None,
) -> None:
    """Print `rows` (mappings or dataclasses) to `out` (stdout) as "table", "json" or "yaml".

    A table uses rich when `rich` is True, or when None and `out` is a terminal.
    """
    out = out or sys.stdout
    data = [plain(r) for r in rows]
    if fmt in ("json", "yaml"):
        out.write(dump(data, fmt))
    elif fmt == "table":
        if rich if rich is not None else out.isatty():
            _rich_table(data, columns, out, title)
        else:
            out.write(table_text(data, columns))
    else:
        raise ValueError(f"unknown output format {fmt!r}, expected one of {', '.join(FORMATS)}")
