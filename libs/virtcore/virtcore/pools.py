"""Resource pools: the YAML config that declares them, its schema and validation, and which
discovered NIC falls in which pool.

`SCHEMA` is the one description of every config key; `parse_config` walks it, so docs generated
from it and the validation cannot drift apart. Everything after `parse_config` works on
normalised, typed values (lower-case hex IDs with `0x`, canonical PCI addresses, lower-case MACs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from virtcore import pci
from virtcore.schema import ConfigError as ConfigError
from virtcore.schema import Invalid, Key, Walker, kind, rows

if TYPE_CHECKING:
    from virtcore.discovery import Nic

DEFAULT_RESOURCE = "kernel.org/virt"
DEFAULT_SOURCE = "<embedded default>"
# The seed's behaviour: one pool of every eligible virtio_net NIC (the node's own NICs are never
# eligible, see discovery.exclusion).
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


def check_resource_name(value: str) -> str:
    expected = (
        "<domain>/<name> such as kernel.org/virt (a lower-case DNS domain of at most 244"
        " characters, not kubernetes.io; a name of at most 63 letters, digits, '-', '_', '.')"
    )
    domain, sep, name = value.partition("/")
    if not sep or not domain or not name:
        raise Invalid(f"{value!r} is not <domain>/<name>", expected)
    if "kubernetes.io/" in value or value.startswith("requests."):
        raise Invalid(f"{value!r} is reserved for Kubernetes (the kubelet refuses it)", expected)
    if "/" in name:
        raise Invalid(f"{value!r} has more than one '/'", expected)
    if len(domain) > 244 or not _DOMAIN.fullmatch(domain):
        raise Invalid(f"{domain!r} is not a DNS domain of at most 244 characters", expected)
    if len(name) > 63 or not _NAME.fullmatch(name):
        raise Invalid(f"{name!r} is not a valid resource name (at most 63 characters)", expected)
    return value


def _hex_id(value: str) -> str:
    m = _HEX_ID.match(value.lower())
    if not m:
        raise Invalid(
            f"{value!r} is not a 4-digit hex ID", 'a quoted hex ID like "1af4" or "0x1041"'
        )
    return "0x" + m.group(2)


def _pci_address(value: str) -> str:
    try:
        return pci.normalize(value)
    except pci.PCIAddressError:
        raise Invalid(
            f"{value!r} is not a PCI address", "domain:bus:device.function, e.g. 0000:00:0a.0"
        ) from None


def _mac(value: str) -> str:
    v = value.lower().replace("-", ":")
    if not _MAC.match(v):
        raise Invalid(f"{value!r} is not a MAC address", "six hex pairs like 52:54:00:12:34:56")
    return v


def _ifname(value: str) -> str:
    bad = any(c in value for c in "/:") or any(c.isspace() for c in value)
    if not value or len(value.encode()) > 15 or bad or value in (".", ".."):
        raise Invalid(
            f"{value!r} is not an interface name",
            "1 to 15 bytes without '/', ':' or whitespace",
        )
    return value


def _driver(value: str) -> str:
    if not _DRIVER.match(value):
        raise Invalid(f"{value!r} is not a driver name", "a kernel driver name like virtio_net")
    return value


# -- the schema ---------------------------------------------------------------------------------


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
        check_resource_name,
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

_SELECTOR_FIELDS = {
    "drivers": "drivers",
    "vendors": "vendors",
    "devices": "devices",
    "pciAddresses": "pci_addresses",
    "ifNames": "if_names",
    "macs": "macs",
}


class _Walker(Walker):
    """Checks a loaded pool config document against SCHEMA."""

    def __init__(self, source: str) -> None:
        super().__init__(SCHEMA, source)

    def config(self, doc: object) -> Tuple[Pool, ...]:
        top = self.mapping(doc, "", "")
        raw_pools = top["pools"]
        if not isinstance(raw_pools, list) or not raw_pools:
            what = "is an empty list" if isinstance(raw_pools, list) else f"is {kind(raw_pools)}"
            raise self.fail("pools", what, "a list of at least one pool (resourceName, selectors)")
        pools: List[Pool] = []
        seen: Dict[str, int] = {}
        for i, raw in enumerate(raw_pools):
            path = f"pools[{i}]"
            entry = self.mapping(raw, "pools[]", path)
            name_path = f"{path}.resourceName"
            name = self.string(
                entry["resourceName"], self.by_path["pools[].resourceName"], name_path
            )
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
                        v, self.by_path[f"pools[].selectors.{k}"], f"{sel_path}.{k}"
                    )
                    for k, v in raw_sel.items()
                }
                selectors = Selectors(**values)
            pools.append(Pool(resource_name=name, selectors=selectors))
        return tuple(pools)


def _load_pyyaml(text: str) -> Any:
    import yaml  # pants: no-infer-dep (the 3.11 tools; ehost-device reads with yamlsubset)

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return loader.construct_mapping(node)

    UniqueKeyLoader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping  # type: ignore[arg-type]
    )
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(top level)"
        problem = getattr(e, "problem", None) or str(e)
        raise _NotYaml(where, problem) from None


class _NotYaml(Exception):
    def __init__(self, where: str, problem: str) -> None:
        super().__init__(problem)
        self.where = where
        self.problem = problem


def load_document(text: str, source: str, *, reader: str = "pyyaml") -> Any:
    """The YAML document in `text`: read by PyYAML (`reader="pyyaml"`) or by the stdlib-only
    `virtcore.yamlsubset` (`"subset"`, for ehost-device). Raises ConfigError."""
    try:
        if reader == "subset":
            from virtcore import yamlsubset

            try:
                return yamlsubset.load(text)
            except yamlsubset.YamlError as e:
                raise _NotYaml(f"line {e.line}" if e.line else "(top level)", e.problem) from None
        return _load_pyyaml(text)
    except _NotYaml as e:
        raise ConfigError(
            source, e.where, f"not valid YAML ({e.problem})", "a YAML mapping"
        ) from None


def parse_config(text: str, source: str, *, reader: str = "pyyaml") -> Config:
    """Validate and normalise a config document. Raises ConfigError."""
    doc = load_document(text, source, reader=reader)
    if doc is None:
        raise ConfigError(source, "(top level)", "the file is empty", "a mapping with key 'pools'")
    return Config(pools=_Walker(source).config(doc), source=source)


def read_text(path: str, what: str = "YAML file") -> str:
    """The UTF-8 text of `path`. Raises ConfigError naming the file; `what` is the kind of file
    expected, without an article ("YAML file")."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, "(top level)", f"not UTF-8 text ({e.reason})", f"a UTF-8 {what}"
        ) from None
    except OSError as e:
        raise ConfigError(
            path, "(top level)", f"cannot read the file ({e.strerror or e})", f"a readable {what}"
        ) from None


def load_config(path: Optional[str]) -> Config:
    """The config in file `path`, or the embedded default when `path` is None."""
    if path is None:
        return parse_config(DEFAULT_CONFIG_YAML, DEFAULT_SOURCE)
    return parse_config(read_text(path), path)


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
    return rows(SCHEMA)
