"""JSON for the front and VERSION without importing the `json` package.

`import json` costs ~8 ms here (json.decoder imports `re`, which imports `enum`, ...): a third
of the front's whole run. CPython's built-in `_json` accelerator (compiled into every CPython
3.9-3.13, no import cost) parses and escapes strings on its own; this module gives it the few
lines around it. Output is byte for byte `json.dumps`'s with its default separators. A
well-formed document is parsed by the accelerator alone; anything else goes to `json.loads`
itself, which raises the error it always raises.
"""

# No `from __future__ import annotations` here, nor in `cli` and `front`: the __future__ module
# is one more file to load on the front's path. Annotations naming typing's types are quoted.
TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms to import
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover (not CPython)
    _json = None  # type: ignore[assignment]


def dumps(obj: "Any") -> str:
    """json.dumps(obj) for dicts with string keys, lists, tuples, str, int, bool and None."""
    if _json is None:  # pragma: no cover
        import json

        return json.dumps(obj)
    parts: list = []
    _encode(obj, parts)
    return "".join(parts)


def _encode(obj: "Any", out: list) -> None:
    if isinstance(obj, str):
        out.append(_json.encode_basestring_ascii(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, dict):
        out.append("{")
        for i, (k, v) in enumerate(obj.items()):
            if not isinstance(k, str):
                raise TypeError(f"keys must be str, not {type(k).__name__}")
            if i:
                out.append(", ")
            out.append(_json.encode_basestring_ascii(k))
            out.append(": ")
            _encode(v, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(", ")
            _encode(v, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__}")


class _Context:
    """What `_json.make_scanner` reads from a JSONDecoder: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


_WS = " \t\n\r"


def loads(text: str) -> "Any":
    """json.loads(text); ValueError when it is not one JSON document."""
    if _json is None:  # pragma: no cover
        import json

        return json.loads(text)
    body = text.strip(_WS)
    try:
        obj, end = _json.make_scanner(_Context())(body, 0)  # type: ignore[arg-type]
        if end == len(body):
            return obj
    except Exception:  # noqa: S110 (the json package gives the authoritative error below)
        pass
    # Not one well-formed document (or the accelerator could not say why: its error path wants
    # json.decoder loaded): json.loads decides, and raises the error it would have raised.
    import json

    return json.loads(text)
