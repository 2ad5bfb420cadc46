"""The front's JSON (`ehost_device.lean_json`) is the `json` package's, byte for byte, on what
the front encodes and decodes, and refuses what json.loads refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ehost_device import lean_json

DOCS = [
    {"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "1.1.0"]},
    {"PATH": "/usr/bin", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p", "X": 'tab\there "q" \\'},
    {"unicode": "näme ☃ \U0001f600", "surrogate": "bad\udcff", "empty": ""},
    {"code": 11, "neg": -3, "t": True, "f": False, "n": None, "nested": [[1, [2]], {"a": {}}]},
    [],
    {},
]


@pytest.mark.parametrize("doc", DOCS)
def test_dumps_is_json_dumps(doc):
    assert lean_json.dumps(doc) == json.dumps(doc)
    assert lean_json.loads(lean_json.dumps(doc)) == json.loads(json.dumps(doc))


@pytest.mark.parametrize(
    "text",
    [
        ' {"cniVersion": "0.4.0", "x": [1, 2.5e3, -0.5, null, true]}\n',
        '"just a string"',
        "12",
        '{"deep": {"er": {"est": []}}, "esc": "\\u00e9\\n\\ud83d\\ude00"}',
        '{"a": NaN, "b": -Infinity}',
    ],
)
def test_loads_is_json_loads(text):
    got, want = lean_json.loads(text), json.loads(text)
    assert json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize(
    "text", ["", "   ", "{not json", "[1, 2", '{"a": 1} trailing', '{"a": 1,}', "'single'", "\x00"]
)
def test_loads_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        lean_json.loads(text)


def test_the_front_does_not_import_json():
    code = (
        "import sys; from ehost_device import cli, front, lean_json;"
        "lean_json.loads(lean_json.dumps({'a': ['b']}));"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('json', 're', 'typing')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
