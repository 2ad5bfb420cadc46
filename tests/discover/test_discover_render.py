"""virtcore.render: tables, JSON and YAML for the CLIs."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import yaml

from virtcore import render


@dataclass(frozen=True)
class Row:
    name: str
    size: Optional[int]
    ok: bool
    tags: Tuple[str, ...]


ROWS = [Row("alpha", 1, True, ("a", "b")), Row("b", None, False, ())]
COLUMNS = [
    render.Column("name", "name"),
    render.Column("size", "size"),
    render.Column("ok", "ok"),
    render.Column("tags", "tags"),
    render.Column("name", "shout", lambda r: r["name"].upper()),
]


def out_of(fmt: str, **kw) -> str:
    buf = io.StringIO()
    render.render(ROWS, COLUMNS, fmt, out=buf, **kw)
    return buf.getvalue()


def test_plain_table_is_aligned():
    assert out_of("table").splitlines() == [
        "NAME   SIZE  OK   TAGS  SHOUT",
        "alpha  1     yes  a, b  ALPHA",
        "b      -     no   -     B",
    ]


def test_rich_table_when_asked():
    text = out_of("table", rich=True, title="things")
    assert "things" in text and "ALPHA" in text and "│" in text


def test_json_and_yaml_keep_field_order_and_all_fields():
    data = json.loads(out_of("json"))
    assert data == [
        {"name": "alpha", "size": 1, "ok": True, "tags": ["a", "b"]},
        {"name": "b", "size": None, "ok": False, "tags": []},
    ]
    assert [list(d) for d in data] == [["name", "size", "ok", "tags"]] * 2
    assert yaml.safe_load(out_of("yaml")) == data
    assert out_of("yaml").startswith("- name: alpha\n  size: 1\n")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="expected one of table, json, yaml"):
        out_of("xml")


def test_empty_rows():
    buf = io.StringIO()
    render.render([], COLUMNS, "json", out=buf)
    assert json.loads(buf.getvalue()) == []
    buf = io.StringIO()
    render.render([], COLUMNS, "table", out=buf)
    assert buf.getvalue().split() == ["NAME", "SIZE", "OK", "TAGS", "SHOUT"]
