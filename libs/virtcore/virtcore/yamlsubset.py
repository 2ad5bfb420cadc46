"""A reader for the block-style YAML that virtdp's own files use, for tools that cannot ship
PyYAML (ehost-device runs on any node CPython 3.9-3.13 from one set of pure-Python files).

It reads what the pool config and the node policy are written in: block mappings and sequences
by indentation, one-line flow sequences and mappings of scalars (`[a, "b"]`, `{}`), plain,
single- and double-quoted scalars, comments, a leading `---`. Plain scalars resolve as PyYAML's
SafeLoader resolves them (YAML 1.1: `yes` is true, `0x1af4` and `52:54:00:12:34:56` are numbers),
so a file means the same to every virtdp tool; a duplicate key is refused. Anything else (anchors,
aliases, tags, block scalars, multi-line scalars, several documents) is refused with the line it
is on, never guessed at.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple


class YamlError(ValueError):
    """The text is not YAML this reader takes. `line` is 1-based (0: the whole text)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        super().__init__(f"line {line}: {problem}" if line else problem)


# YAML 1.1 implicit types, as PyYAML's SafeLoader resolves plain scalars.
_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL_TRUE = re.compile(r"yes|Yes|YES|true|True|TRUE|on|On|ON")
_BOOL_FALSE = re.compile(r"no|No|NO|false|False|FALSE|off|Off|OFF")
_INT = re.compile(
    r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
    r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+"
)
_FLOAT = re.compile(
    r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
    r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)


def _resolve_int(text: str) -> int:
    t = text.replace("_", "")
    sign = -1 if t.startswith("-") else 1
    body = t.lstrip("+-")
    if body == "0":
        return 0
    if body.startswith("0b"):
        return sign * int(body[2:], 2)
    if body.startswith("0x"):
        return sign * int(body[2:], 16)
    if body.startswith("0"):
        return sign * int(body, 8)
    if ":" in body:
        return sign * int(_base60(body, int))
    return sign * int(body)


def _resolve_float(text: str) -> float:
    t = text.replace("_", "").lower()
    sign = -1.0 if t.startswith("-") else 1.0
    body = t.lstrip("+-")
    if body == ".inf":
        return sign * float("inf")
    if body == ".nan":
        return float("nan")
    if ":" in body:
        return sign * float(_base60(body, float))
    return sign * float(body)


def _base60(body: str, cast: Any) -> Any:
    """YAML 1.1's sexagesimal numbers: 1:30 is 90, 1:30.5 is 90.5."""
    value = cast(0)
    for part in body.split(":"):
        value = value * 60 + cast(part)
    return value


def resolve_plain(text: str) -> Any:
    """A plain (unquoted) scalar's value, as YAML 1.1 resolves it."""
    if _NULL.fullmatch(text):
        return None
    if _BOOL_TRUE.fullmatch(text):
        return True
    if _BOOL_FALSE.fullmatch(text):
        return False
    if _INT.fullmatch(text):
        return _resolve_int(text)
    if _FLOAT.fullmatch(text):
        return _resolve_float(text)
    return text


_DOUBLE_ESCAPES = {
    "0": "\0",
    "a": "\a",
    "b": "\b",
    "t": "\t",
    "\t": "\t",
    "n": "\n",
    "v": "\v",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    " ": " ",
    '"': '"',
    "/": "/",
    "\\": "\\",
    "N": "\x85",
    "_": "\xa0",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class _Line:
    __slots__ = ("number", "indent", "text")

    def __init__(self, number: int, indent: int, text: str) -> None:
        self.number = number
        self.indent = indent
        self.text = text


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines = self._lines(text)
        self.pos = 0

    # -- lines ------------------------------------------------------------------------------
    @staticmethod
    def _lines(text: str) -> List[_Line]:
        out: List[_Line] = []
        started = ended = False
        for number, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw[: len(raw) - len(raw.lstrip(" \t"))]:
                raise YamlError(number, "a tab in the indentation (YAML indents with spaces)")
            body = _strip_comment(raw, number).rstrip()
            stripped = body.lstrip(" ")
            if not stripped:
                continue
            if ended:
                raise YamlError(number, "more than one YAML document is not supported")
            if stripped.startswith("%"):
                raise YamlError(number, "directives (%) are not supported")
            if body == "...":  # the end of the document
                ended = True
                continue
            if body == "---" or body.startswith("--- "):
                if body.startswith("--- ") and body[4:].strip():
                    raise YamlError(number, "content on the '---' line is not supported")
                if out or (started and body == "---"):
                    raise YamlError(number, "more than one YAML document is not supported")
                started = True
                continue
            out.append(_Line(number, len(body) - len(stripped), stripped))
        return out

    def peek(self) -> Optional[_Line]:
        return self.lines[self.pos] if self.pos < len(self.lines) else None

    # -- nodes ------------------------------------------------------------------------------
    def document(self) -> Any:
        first = self.peek()
        if first is None:
            return None
        value = self.block(first.indent)
        extra = self.peek()
        if extra is not None:
            raise YamlError(extra.number, "unexpected content (check the indentation)")
        return value

    def block(self, indent: int) -> Any:
        line = self.peek()
        assert line is not None
        if line.indent != indent:
            raise YamlError(line.number, "unexpected indentation")
        if _is_item(line.text):
            return self.sequence(indent)
        if line.text == "?" or line.text.startswith("? "):
            raise YamlError(line.number, "complex keys (?) are not supported")
        if _split_key(line.text, line.number) is not None:
            return self.mapping(indent)
        self.pos += 1
        return self.scalar_line(line.text, line.number)

    def sequence(self, indent: int) -> List[Any]:
        out: List[Any] = []
        while True:
            line = self.peek()
            if line is None or line.indent < indent:
                return out
            if line.indent > indent:
                raise YamlError(line.number, "unexpected indentation")
            if not _is_item(line.text):
                return out
            rest = line.text[1:].lstrip(" ")
            if not rest:  # "-" alone: the item is the block below
                self.pos += 1
                nxt = self.peek()
                if nxt is None or nxt.indent <= indent:
                    out.append(None)
                else:
                    out.append(self.block(nxt.indent))
                continue
            # "- x": the item starts on this line, at the column of x.
            column = indent + (len(line.text) - len(rest))
            self.lines[self.pos] = _Line(line.number, column, rest)
            out.append(self.block(column))

    def mapping(self, indent: int) -> Dict[Any, Any]:
        out: Dict[Any, Any] = {}
        while True:
            line = self.peek()
            if line is None or line.indent < indent:
                return out
            if line.indent > indent:
                raise YamlError(line.number, "unexpected indentation")
            split = _split_key(line.text, line.number)
            if split is None:
                if _is_item(line.text):
                    return out
                raise YamlError(line.number, f"expected 'key: value', got {line.text!r}")
            key_text, rest = split
            key = self.key(key_text, line.number)
            if key in out:
                raise YamlError(line.number, f"duplicate key {key!r}")
            self.pos += 1
            if rest:
                out[key] = self.scalar_line(rest, line.number)
                continue
            nxt = self.peek()
            if nxt is not None and (
                nxt.indent > indent or (nxt.indent == indent and _is_item(nxt.text))
            ):
                out[key] = self.block(nxt.indent)
            else:
                out[key] = None

    def key(self, text: str, number: int) -> Any:
        if text.startswith(("'", '"')):
            value, end = _quoted(text, 0, number)
            if text[end:].strip():
                raise YamlError(number, f"unexpected text after the quoted key {text!r}")
            return value
        if text.startswith(("[", "{", "?", "&", "*", "!")):
            raise YamlError(number, f"complex keys are not supported ({text!r})")
        return resolve_plain(text)

    def scalar_line(self, text: str, number: int) -> Any:
        """The value that makes up the rest of a line (a scalar or a one-line flow)."""
        if text.startswith(("[", "{")):
            value, end = _flow(text, 0, number)
            if text[end:].strip():
                raise YamlError(number, f"unexpected text after {text[:end]!r}")
            return value
        if text.startswith(("'", '"')):
            value, end = _quoted(text, 0, number)
            if text[end:].strip():
                raise YamlError(number, f"unexpected text after the quoted value {text[:end]!r}")
            return value
        if text[0] in "&*!":
            raise YamlError(number, "anchors, aliases and tags are not supported")
        if text[0] in "|>":
            raise YamlError(number, "block scalars (| and >) are not supported")
        if text[0] in "@`":
            raise YamlError(number, f"a plain value cannot start with {text[0]!r}")
        # A deeper line after this one (a multi-line value) is refused by the caller as
        # unexpected indentation.
        return resolve_plain(text)


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _strip_comment(raw: str, number: int) -> str:
    """The line without its comment: `#` at the start or after a space, outside quotes."""
    quote = None
    i = 0
    while i < len(raw):
        c = raw[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                if quote == "'" and raw[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                quote = None
        elif c in "'\"" and (i == 0 or raw[i - 1] in " \t[{,:-"):
            quote = c
        elif c == "#" and (i == 0 or raw[i - 1] in " \t"):
            return raw[:i]
        i += 1
    return raw


def _split_key(text: str, number: int) -> Optional[Tuple[str, str]]:
    """(key text, rest) when the line is `key: rest` or `key:`, else None."""
    if text.startswith(("'", '"')):
        _, end = _quoted(text, 0, number)
        after = text[end:]
        if after.startswith(":") and (len(after) == 1 or after[1] == " "):
            return text[:end], after[1:].strip()
        return None
    if text.startswith(("[", "{")):
        return None
    i = 0
    while True:
        i = text.find(":", i)
        if i < 0:
            return None
        if i + 1 == len(text) or text[i + 1] == " ":
            return text[:i].rstrip(), text[i + 1 :].strip()
        i += 1


def _quoted(text: str, start: int, number: int) -> Tuple[str, int]:
    """A quoted scalar starting at `start`: (value, index after the closing quote)."""
    q = text[start]
    out: List[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if q == "'":
            if c == "'":
                if text[i + 1 : i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out), i + 1
            out.append(c)
            i += 1
            continue
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            e = text[i + 1 : i + 2]
            if e in _DOUBLE_ESCAPES:
                out.append(_DOUBLE_ESCAPES[e])
                i += 2
                continue
            if e in _HEX_ESCAPES:
                n = _HEX_ESCAPES[e]
                digits = text[i + 2 : i + 2 + n]
                if len(digits) != n or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                    raise YamlError(number, f"bad escape \\{e}{digits} in a double-quoted value")
                out.append(chr(int(digits, 16)))
                i += 2 + n
                continue
            raise YamlError(number, f"unknown escape \\{e} in a double-quoted value")
        out.append(c)
        i += 1
    raise YamlError(
        number, "a quoted value is not closed on its line (multi-line values are not supported)"
    )


def _flow(text: str, start: int, number: int) -> Tuple[Any, int]:
    """A one-line flow sequence or mapping of scalars (and nested flows)."""
    opener = text[start]
    closer = "]" if opener == "[" else "}"
    seq: List[Any] = []
    mapping: Dict[Any, Any] = {}
    i = start + 1
    while True:
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text):
            raise YamlError(number, f"{opener!r} is not closed on its line")
        if text[i] == closer:
            return (seq if opener == "[" else mapping), i + 1
        item, i = _flow_scalar(text, i, number, closer)
        if opener == "{":
            while i < len(text) and text[i] == " ":
                i += 1
            if text[i : i + 1] != ":":
                raise YamlError(number, "a flow mapping entry needs 'key: value'")
            value, i = _flow_scalar(text, i + 1, number, closer)
            if item in mapping:
                raise YamlError(number, f"duplicate key {item!r}")
            mapping[item] = value
        else:
            seq.append(item)
        while i < len(text) and text[i] == " ":
            i += 1
        if text[i : i + 1] == ",":
            i += 1
        elif i >= len(text):
            raise YamlError(number, f"{opener!r} is not closed on its line")
        elif text[i] != closer:
            raise YamlError(number, f"expected ',' or {closer!r} in {text!r}")


def _flow_scalar(text: str, i: int, number: int, closer: str) -> Tuple[Any, int]:
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] in "[{":
        return _flow(text, i, number)
    if i < len(text) and text[i] in "'\"":
        return _quoted(text, i, number)
    if i < len(text) and text[i] in "&*!|>":
        raise YamlError(number, "anchors, aliases, tags and block scalars are not supported")
    j = i
    while (
        j < len(text)
        and text[j] not in ",]}"
        and not (text[j] == ":" and (j + 1 == len(text) or text[j + 1] in " ,]}"))
    ):
        j += 1
    return resolve_plain(text[i:j].strip()), j


def load(text: str) -> Any:
    """The document in `text` (None when it is empty). Raises YamlError."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return _Reader(text).document()
