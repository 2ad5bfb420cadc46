"""The schema machinery behind virtdp's config files: one `Key` per setting, and a `Walker` that
checks a loaded document against a tuple of them and raises `ConfigError` at the first problem.

The same tuple drives validation and the generated reference docs, so the two cannot drift.
Stdlib only, Python 3.9 syntax: ehost-device (any node CPython) validates its node policy here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A config that cannot be used. str(e) = "<file>: <key path>: <what was wrong>, expected
    <what>"."""

    def __init__(self, source: str, key_path: str, problem: str, expected: str) -> None:
        self.source = source
        self.key_path = key_path
        self.problem = problem
        self.expected = expected
        super().__init__(f"{source}: {key_path}: {problem}, expected {expected}")


class Invalid(Exception):
    """Raised by a value check: what was wrong, and what was expected instead."""

    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.expected = expected


@dataclass(frozen=True)
class Key:
    """One config key. `path` uses `[]` for list items: "pools[].selectors.vendors"."""

    path: str
    type: str  # "list of mappings", "mapping", "string", "list of strings", "number"
    required: bool
    default: Any  # what an absent key means (None when required)
    description: str
    example: Any
    # Normaliser of one string value (of each item for "list of strings"); not part of the docs.
    check: Optional[Callable[[str], str]] = field(default=None, repr=False, compare=False)


_TYPE_NAMES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "nothing (null)",
}


def kind(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def rows(schema: Sequence[Key]) -> List[Dict[str, Any]]:
    """`schema` as plain dicts (path, type, required, default, description, example), for docs."""
    return [
        {
            "path": k.path,
            "type": k.type,
            "required": k.required,
            "default": k.default,
            "description": k.description,
            "example": k.example,
        }
        for k in schema
    ]


class Walker:
    """Checks a loaded document against `schema`, raising ConfigError at the first problem."""

    def __init__(self, schema: Sequence[Key], source: str) -> None:
        self.schema = tuple(schema)
        self.by_path: Dict[str, Key] = {k.path: k for k in self.schema}
        self.source = source

    def fail(self, key_path: str, problem: str, expected: str) -> ConfigError:
        return ConfigError(self.source, key_path or "(top level)", problem, expected)

    def children(self, schema_path: str) -> List[str]:
        """Names of the keys directly below `schema_path` ("" = top level)."""
        prefix = schema_path + "." if schema_path else ""
        out = []
        for k in self.schema:
            rest = k.path[len(prefix) :] if k.path.startswith(prefix) else None
            if rest and "." not in rest.replace("[]", ""):
                out.append(rest)
        return out

    def mapping(self, value: object, schema_path: str, key_path: str) -> Dict[str, Any]:
        allowed = self.children(schema_path)
        if not isinstance(value, dict):
            raise self.fail(key_path, f"is {kind(value)}", f"a mapping with keys {allowed}")
        for name in value:
            if name not in allowed:
                where = f"{key_path}.{name}" if key_path else str(name)
                raise self.fail(where, "unknown key", f"one of {allowed}")
        for name in allowed:
            key = self.by_path[f"{schema_path}.{name}" if schema_path else name]
            if key.required and name not in value:
                where = f"{key_path}.{name}" if key_path else name
                raise self.fail(where, "missing", f"a {key.type}: {key.description}")
        return value

    def string(self, value: object, key: Key, key_path: str) -> str:
        if not isinstance(value, str):
            example = key.example[0] if isinstance(key.example, list) else key.example
            problem = f"is {kind(value)} ({value!r})"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # YAML 1.1 reads 0x1af4, 1000 and even 52:54:00:12:34:56 as numbers.
                problem += ", YAML read it as a number"
            raise self.fail(key_path, problem, f'a quoted string like "{example}"')
        if key.check is None:
            return value
        try:
            return key.check(value)
        except Invalid as e:
            raise self.fail(key_path, e.problem, e.expected) from None

    def strings(self, value: object, key: Key, key_path: str) -> Tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key_path, f"is {kind(value)}", f"a list of strings like {key.example}")
        if not value:
            raise self.fail(
                key_path,
                "is an empty list",
                f"at least one item (leave {key_path} out to match all)",
            )
        out: List[str] = []
        for i, item in enumerate(value):
            norm = self.string(item, key, f"{key_path}[{i}]")
            if norm not in out:
                out.append(norm)
        return tuple(out)

    def number(self, value: object, key: Key, key_path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self.fail(
                key_path, f"is {kind(value)} ({value!r})", f"a number such as {key.example}"
            )
        return float(value)
