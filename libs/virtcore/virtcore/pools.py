"""Resource pools: the YAML config that declares them, its schema and validation, and which
discovered NIC falls in which pool.

`SCHEMA` is the one description of every config key; `parse_config` walks it, so docs generated
from it and the validation cannot drift apart. Everything after `parse_config` works on
normalised, typed values (lower-case hex IDs with `0x`, canonical PCI addresses, lower-case MACs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from virtcore import pci
from virtcore.discovery import Nic

DEFAULT_RESOURCE = "kernel.org/virt"
DEFAULT_SOURCE = "<embedded default>"
# The seed's behaviour: one pool of every eligible virtio_net NIC (default-route NICs are never
# eligible, see discovery).
DEFAULT_CONFIG_YAML = f"""\
pools:
  - resourceName: {DEFAULT_RESOURCE}
    selectors:
      drivers: [virtio_net]
"""


@dataclass(frozen=True)
class Selectors:
    """An empty tuple puts no constraint on that attribute; every non-empty one must match."""

    drivers: Tuple[str, ...] = ()
    vendors: Tuple[str, ...] = ()  # "0x1af4"
    devices: Tuple[str, ...] = ()  # "0x1000", "0x1041"
    pci_addresses: Tuple[str, ...] = ()  # "0000:00:0a.0"
    if_names: Tuple[str, ...] = ()
    macs: Tuple[str, ...] = ()  # "52:54:00:12:34:56"

    def matches(self, nic: Nic) -> bool:
        checks = (
            (self.drivers, nic.driver),
            (self.vendors, nic.vendor),
            (self.devices, nic.device),
            (self.pci_addresses, nic.pci_address),
            (self.if_names, nic.ifname),
            (self.macs, nic.mac.lower() if nic.mac else None),
        )
        return all(not wanted or value in wanted for wanted, value in checks)


@dataclass(frozen=True)
class Pool:
    resource_name: str  # "<domain>/<name>"
    selectors: Selectors = field(default_factory=Selectors)


@dataclass(frozen=True)
class Config:
    pools: Tuple[Pool, ...]
    source: str  # file path, or "<embedded default>"


class ConfigError(ValueError):
    """A config that cannot be used. str(e) = "<file>: <key path>: <what was wrong>, expected
    <what>"."""

    def __init__(self, source: str, key_path: str, problem: str, expected: str) -> None:
        self.source = source
        self.key_path = key_path
        self.problem = problem
        self.expected = expected
        super().__init__(f"{source}: {key_path}: {problem}, expected {expected}")


# -- value checks: each returns the normalised value or raises _Invalid ------------------------


class _Invalid(Exception):
    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.expected = expected


# Kubernetes extended resource names, as the kubelet's Register checks them
# (v1helper.IsExtendedResourceName): "requests.<name>" must be a qualified name, so the domain
# is a DNS subdomain of at most 253 - len("requests.") = 244 characters, and a name containing
# "kubernetes.io/" is a native resource. fullmatch: Go's `$` does not match before a newline.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_HEX_ID = re.compile(r"^(0x)?([0-9a-f]{4})$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DRIVER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _resource_name(value: str) -> str:
    expected = (
        "<domain>/<name> such as kernel.org/virt (a lower-case DNS domain of at most 244"
        " characters, not kubernetes.io; a name of at most 63 letters, digits, '-', '_', '.')"
    )
    domain, sep, name = value.partition("/")
    if not sep or not domain or not name:
        raise _Invalid(f"{value!r} is not <domain>/<name>", expected)
    if "kubernetes.io/" in value or value.startswith("requests."):
        raise _Invalid(f"{value!r} is reserved for Kubernetes (the kubelet refuses it)", expected)
    if "/" in name:
        raise _Invalid(f"{value!r} has more than one '/'", expected)
    if len(domain) > 244 or not _DOMAIN.fullmatch(domain):
        raise _Invalid(f"{domain!r} is not a DNS domain of at most 244 characters", expected)
    if len(name) > 63 or not _NAME.fullmatch(name):
        raise _Invalid(f"{name!r} is not a valid resource name (at most 63 characters)", expected)
    return value


def _hex_id(value: str) -> str:
    m = _HEX_ID.match(value.lower())
    if not m:
        raise _Invalid(
            f"{value!r} is not a 4-digit hex ID", 'a quoted hex ID like "1af4" or "0x1041"'
        )
    return "0x" + m.group(2)


def _pci_address(value: str) -> str:
    try:
        return pci.normalize(value)
    except pci.PCIAddressError:
        raise _Invalid(
            f"{value!r} is not a PCI address", "domain:bus:device.function, e.g. 0000:00:0a.0"
        ) from None


def _mac(value: str) -> str:
    v = value.lower().replace("-", ":")
    if not _MAC.match(v):
        raise _Invalid(f"{value!r} is not a MAC address", "six hex pairs like 52:54:00:12:34:56")
    return v


def _ifname(value: str) -> str:
    bad = any(c in value for c in "/:") or any(c.isspace() for c in value)
    if not value or len(value.encode()) > 15 or bad or value in (".", ".."):
        raise _Invalid(
            f"{value!r} is not an interface name",
            "1 to 15 bytes without '/', ':' or whitespace",
        )
    return value


def _driver(value: str) -> str:
    if not _DRIVER.match(value):
        raise _Invalid(f"{value!r} is not a driver name", "a kernel driver name like virtio_net")
    return value


# -- the schema ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key. `path` uses `[]` for list items: "pools[].selectors.vendors"."""

    path: str
    type: str  # "list of mappings", "mapping", "string", "list of strings"
    required: bool
    default: Any  # what an absent key means (None when required)
    description: str
    example: Any
    # Normaliser of one string value (of each item for "list of strings"); not part of the docs.
    check: Optional[Callable[[str], str]] = field(default=None, repr=False, compare=False)


SCHEMA: Tuple[Key, ...] = (
    Key(
        "pools",
        "list of mappings",
        True,
        None,
        "The resource pools. Each eligible NIC goes to the first pool whose selectors all match.",
        [{"resourceName": DEFAULT_RESOURCE, "selectors": {"drivers": ["virtio_net"]}}],
    ),
    Key(
        "pools[].resourceName",
        "string",
        True,
        None,
        "Extended resource name pods request, <domain>/<name>; unique across pools.",
        DEFAULT_RESOURCE,
        _resource_name,
    ),
    Key(
        "pools[].selectors",
        "mapping",
        False,
        {},
        "What a NIC must match to be in the pool; absent = every eligible virtio NIC.",
        {"drivers": ["virtio_net"], "devices": ["1041"]},
    ),
    Key(
        "pools[].selectors.drivers",
        "list of strings",
        False,
        [],
        "Virtio-level driver of the NIC.",
        ["virtio_net"],
        _driver,
    ),
    Key(
        "pools[].selectors.vendors",
        "list of strings",
        False,
        [],
        "PCI vendor IDs, 4 hex digits, with or without 0x (quote them in YAML).",
        ["1af4"],
        _hex_id,
    ),
    Key(
        "pools[].selectors.devices",
        "list of strings",
        False,
        [],
        "PCI device IDs: 1000 legacy, 1041 modern virtio-net (quote them in YAML).",
        ["1000", "1041"],
        _hex_id,
    ),
    Key(
        "pools[].selectors.pciAddresses",
        "list of strings",
        False,
        [],
        "PCI addresses of the NICs' functions, domain:bus:device.function.",
        ["0000:00:0a.0"],
        _pci_address,
    ),
    Key(
        "pools[].selectors.ifNames",
        "list of strings",
        False,
        [],
        "Interface names; only match NICs whose netdev is in the namespace discovery reads.",
        ["eth1"],
        _ifname,
    ),
    Key(
        "pools[].selectors.macs",
        "list of strings",
        False,
        [],
        "MAC addresses; only match NICs whose netdev is in the namespace discovery reads.",
        ["52:54:00:12:34:56"],
        _mac,
    ),
)

_BY_PATH: Dict[str, Key] = {k.path: k for k in SCHEMA}
_SELECTOR_FIELDS = {
    "drivers": "drivers",
    "vendors": "vendors",
    "devices": "devices",
    "pciAddresses": "pci_addresses",
    "ifNames": "if_names",
    "macs": "macs",
}


def _children(schema_path: str) -> List[str]:
    """Names of the keys directly below `schema_path` ("" = top level)."""
    prefix = schema_path + "." if schema_path else ""
    out = []
    for k in SCHEMA:
        rest = k.path[len(prefix) :] if k.path.startswith(prefix) else None
        if rest and "." not in rest.replace("[]", ""):
            out.append(rest)
    return out


_TYPE_NAMES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "nothing (null)",
}


def _kind(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class _Walker:
    """Checks a loaded YAML document against SCHEMA, raising ConfigError at the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key_path: str, problem: str, expected: str) -> ConfigError:
        return ConfigError(self.source, key_path or "(top level)", problem, expected)

    def mapping(self, value: object, schema_path: str, key_path: str) -> Dict[str, Any]:
        allowed = _children(schema_path)
        if not isinstance(value, dict):
            raise self.fail(key_path, f"is {_kind(value)}", f"a mapping with keys {allowed}")
        for name in value:
            if name not in allowed:
                where = f"{key_path}.{name}" if key_path else str(name)
                raise self.fail(where, "unknown key", f"one of {allowed}")
        for name in allowed:
            key = _BY_PATH[f"{schema_path}.{name}" if schema_path else name]
            if key.required and name not in value:
                where = f"{key_path}.{name}" if key_path else name
                raise self.fail(where, "missing", f"{key.type}: {key.description}")
        return value

    def string(self, value: object, key: Key, key_path: str) -> str:
        if not isinstance(value, str):
            example = key.example[0] if isinstance(key.example, list) else key.example
            problem = f"is {_kind(value)} ({value!r})"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # YAML 1.1 reads 0x1af4, 1000 and even 52:54:00:12:34:56 as numbers.
                problem += ", YAML read it as a number"
            raise self.fail(key_path, problem, f'a quoted string like "{example}"')
        if key.check is None:
            return value
        try:
            return key.check(value)
        except _Invalid as e:
            raise self.fail(key_path, e.problem, e.expected) from None

    def strings(self, value: object, key: Key, key_path: str) -> Tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key_path, f"is {_kind(value)}", f"a list of strings like {key.example}")
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

    def config(self, doc: object) -> Tuple[Pool, ...]:
        top = self.mapping(doc, "", "")
        raw_pools = top["pools"]
        if not isinstance(raw_pools, list) or not raw_pools:
            what = "is an empty list" if isinstance(raw_pools, list) else f"is {_kind(raw_pools)}"
            raise self.fail("pools", what, "a list of at least one pool (resourceName, selectors)")
        pools: List[Pool] = []
        seen: Dict[str, int] = {}
        for i, raw in enumerate(raw_pools):
            path = f"pools[{i}]"
            entry = self.mapping(raw, "pools[]", path)
            name_path = f"{path}.resourceName"
            name = self.string(entry["resourceName"], _BY_PATH["pools[].resourceName"], name_path)
            if name in seen:
                raise self.fail(
                    name_path,
                    f"duplicate resource name {name!r} (also pools[{seen[name]}])",
                    "each resourceName once",
                )
            seen[name] = i
            selectors = Selectors()
            if "selectors" in entry:
                sel_path = f"{path}.selectors"
                raw_sel = self.mapping(entry["selectors"], "pools[].selectors", sel_path)
                values = {
                    _SELECTOR_FIELDS[k]: self.strings(
                        v, _BY_PATH[f"pools[].selectors.{k}"], f"{sel_path}.{k}"
                    )
                    for k, v in raw_sel.items()
                }
                selectors = Selectors(**values)
            pools.append(Pool(resource_name=name, selectors=selectors))
        return tuple(pools)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping  # type: ignore[arg-type]
)


def parse_config(text: str, source: str) -> Config:
    """Validate and normalise a config document. Raises ConfigError."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top level)"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(source, where, f"not valid YAML ({problem})", "a YAML mapping") from None
    if doc is None:
        raise ConfigError(source, "(top level)", "the file is empty", "a mapping with key 'pools'")
    return Config(pools=_Walker(source).config(doc), source=source)


def load_config(path: Optional[str]) -> Config:
    """The config in file `path`, or the embedded default when `path` is None."""
    if path is None:
        return parse_config(DEFAULT_CONFIG_YAML, DEFAULT_SOURCE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, "(top level)", f"not UTF-8 text ({e.reason})", "a YAML file"
        ) from None
    except OSError as e:
        raise ConfigError(
            path, "(top level)", f"cannot read the file ({e.strerror or e})", "a readable YAML file"
        ) from None
    return parse_config(text, path)


def assign(config: Config, nics: Sequence[Nic]) -> List[Nic]:
    """Copies of `nics` with `.pool` set: eligible NICs go to the first pool whose selectors all
    match; ineligible and unmatched NICs get None."""
    out = []
    for nic in nics:
        pool = None
        if nic.eligible:
            pool = next((p.resource_name for p in config.pools if p.selectors.matches(nic)), None)
        out.append(replace(nic, pool=pool))
    return out


def schema_rows() -> List[Dict[str, Any]]:
    """SCHEMA as plain dicts (path, type, required, default, description, example), for docs."""
    return [
        {
            "path": k.path,
            "type": k.type,
            "required": k.required,
            "default": k.default,
            "description": k.description,
            "example": k.example,
        }
        for k in SCHEMA
    ]
