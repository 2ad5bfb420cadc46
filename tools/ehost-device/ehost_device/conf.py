"""The CNI contract on the way in: versions, error codes, env and config, validated in one place.

Everything after `load()` works on the frozen `Env` and `Conf` it returns. Stdlib only: on
the start path of every command, VERSION included.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from ehost_device import LATEST as LATEST
from ehost_device import SUPPORTED_VERSIONS as SUPPORTED_VERSIONS

if TYPE_CHECKING:
    from ehost_device.policy import Policy

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# Well-known codes (CNI spec 1.1, "Error") and this plugin's own (100+).
E_INCOMPATIBLE_VERSION = 1
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_INVALID_NETNS = 8  # CNI_NETNS is the plugin's own namespace (libcni's ErrInvalidNetNS)
E_TRY_AGAIN = 11
E_NOT_AVAILABLE = 50
E_NIC_NOT_FOUND = 100  # no such PCI function / host interface
E_NOT_VIRTIO = 101  # the device is not a virtio NIC bound to virtio_net
E_NIC_BUSY = 102  # the NIC is not in the host namespace (another pod has it)
E_IFNAME_EXISTS = 103  # CNI_IFNAME already exists in the pod namespace
E_NETNS_MISSING = 104  # CNI_NETNS does not exist
E_IPAM = 105  # IPAM plugin missing or failed
E_IPAM_RESULT = 106  # IPAM result unusable
E_NETLINK = 107  # a link, address or route operation failed
E_CHECK = 108  # CHECK found the attachment not as expected
E_POLICY = 109  # the node policy file (or the pool config it names) is unusable
E_NOT_ALLOWED = 110  # the node policy refuses the NIC: the node's own, or outside allowed pools
E_CLAIM_RECORD = 111  # the DRA claim record (claims.json) is unusable, or names a NIC wrongly
E_NO_CLAIM = 112  # by claim through a NAD: the pod holds no claimed NIC for this attachment

# Settings of the node, not of a network: a network config is tenant input (whoever may write a
# NetworkAttachmentDefinition), so these keys are refused there (DEL ignores them) and read from
# the node policy file instead (ehost_device.policy).
NODE_KEYS = ("logFile", "sysfsRoot", "executorSocket", "draStateDir")

# Container IDs and network names (spec 1.1, sections 1 and 2; libcni's ValidateNetworkName).
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_LOG_LEVELS = ("error", "warning", "info", "debug")


class CniError(Exception):
    """An error the plugin reports as CNI error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> Dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


def version_tuple(v: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def valid_ifname(name: str) -> Optional[str]:
    """Why `name` is not a usable interface name (the rules libcni applies), or None."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if len(name.encode()) > 15:
        return f"is {len(name.encode())} bytes long (at most 15)"
    if any(c in name for c in "/:") or any(c.isspace() for c in name):
        return "must not contain '/', ':' or whitespace"
    return None


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Conf:
    cni_version: str
    name: str
    type: str
    pci_address: Optional[str]  # deviceID / pciBusID / runtimeConfig.deviceID, normalised
    device: Optional[str]  # host interface name
    hwaddr: Optional[str]  # host interface MAC, lower case
    mtu: Optional[int]
    mac: Optional[str]
    ipam_type: Optional[str]
    sysfs_root: str  # from the node policy
    log_file: Optional[str]  # from the node policy
    log_level: str  # the config's logLevel, else the node policy's
    lock_timeout: float
    prev_result: Optional[Dict[str, Any]]
    dns: Dict[str, Any]  # the config's own `dns` (spec 1.1, section 1), {} if none
    policy: Policy = field(repr=False, compare=False)  # the node's settings
    raw: Dict[str, Any] = field(repr=False, compare=False)  # the config as received

    @property
    def names_nic(self) -> bool:
        """Whether the config names a NIC; if not, the pod's DRA claims do (`claimed`)."""
        return bool(self.pci_address or self.device or self.hwaddr)


def _err_env(var: str, why: str) -> CniError:
    return CniError(E_INVALID_ENV, f"invalid environment variable {var}: {why}", var)


def load_env(environ: Mapping[str, str]) -> Env:
    """The CNI_* variables, checked for the command in CNI_COMMAND, before stdin is read (as
    libcni's skel does). CNI_PATH is checked later, by `require_path`, once the config says
    whether there is an IPAM plugin to find."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise _err_env(
            "CNI_COMMAND",
            f"{command!r} is not a CNI command (expected one of {', '.join(COMMANDS)})",
        )
    env = Env(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=environ.get("CNI_ARGS", ""),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
    )
    required: List[str] = []
    if command in ("ADD", "CHECK"):
        required = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]
    elif command == "DEL":
        required = ["CNI_CONTAINERID", "CNI_IFNAME"]
    _require(environ, command, required)
    if "CNI_CONTAINERID" in required and not _CONTAINER_ID.match(env.container_id):
        raise _err_env(
            "CNI_CONTAINERID",
            f"{env.container_id!r} must start with a letter or digit, followed by letters, "
            "digits, '_', '.' or '-'",
        )
    if "CNI_IFNAME" in required:
        why = valid_ifname(env.ifname)
        if why:
            raise _err_env("CNI_IFNAME", f"{env.ifname!r} {why}")
    if env.netns and not env.netns.startswith("/"):
        raise _err_env("CNI_NETNS", f"{env.netns!r} is not an absolute path")
    return env


def require_path(environ: Mapping[str, str], command: str, needs_ipam: bool) -> None:
    """CNI_PATH must be set for GC, and for any command that runs the IPAM plugin."""
    if command == "GC" or (needs_ipam and command in ("ADD", "DEL", "CHECK", "STATUS")):
        _require(environ, command, ["CNI_PATH"])


def _require(environ: Mapping[str, str], command: str, required: List[str]) -> None:
    missing = [v for v in required if not environ.get(v)]
    if missing:
        raise CniError(
            E_INVALID_ENV,
            f"missing required environment variable(s) {', '.join(missing)} for {command}",
            ",".join(missing),
        )


def parse_json(data: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8") if data else "")
    except (UnicodeDecodeError, ValueError) as e:
        raise CniError(E_DECODE, "cannot decode the network configuration", str(e)) from None
    if not isinstance(obj, dict):
        raise CniError(
            E_DECODE,
            "cannot decode the network configuration",
            f"expected a JSON object, got {type(obj).__name__}",
        )
    return obj


def requested_version(obj: Mapping[str, Any]) -> str:
    v = obj.get("cniVersion")
    if v not in SUPPORTED_VERSIONS:
        got = "missing" if v is None else repr(v)
        raise CniError(
            E_INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"cniVersion is {got}; this plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return str(v)


def _bad(key: str, value: Any, expected: str) -> CniError:
    return CniError(
        E_INVALID_CONFIG, f"invalid network configuration: {key}", f"{key}={value!r}: {expected}"
    )


def _opt_str(obj: Mapping[str, Any], key: str) -> Optional[str]:
    v = obj.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise _bad(key, v, "expected a string")
    return v


def refuse_node_keys(obj: Mapping[str, Any], policy_source: str) -> None:
    """A network config may not steer host paths: refuse the keys that belong to the node."""
    from ehost_device.policy import ENV

    found = [k for k in NODE_KEYS if k in obj]
    if found:
        raise CniError(
            E_INVALID_CONFIG,
            f"invalid network configuration: {', '.join(found)} is a node setting",
            f"{' and '.join(found)} may not come from a network config (tenant input); "
            f"the node sets it in the ehost-device policy file ({policy_source}; "
            f"path from {ENV}, default /etc/virtdp/ehost-device.yaml)",
        )


def load_conf(obj: Dict[str, Any], cni_version: str, policy: Policy) -> Conf:
    """Validate the plugin config (already decoded, version already checked; node keys already
    refused or, for DEL, ignored) against the node's `policy`.

    A config that names no NIC is valid: the pod's DRA claims name them (ehost_device.claimed).
    """
    from virtcore import pci

    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("name", name, "expected the network name (a non-empty string)")
    if not _CONTAINER_ID.match(name):
        raise _bad(
            "name",
            name,
            "expected a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    ptype = obj.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise _bad("type", ptype, "expected the plugin type (a non-empty string)")

    runtime = obj.get("runtimeConfig")
    if runtime is not None and not isinstance(runtime, dict):
        raise _bad("runtimeConfig", runtime, "expected an object")
    candidates = []
    for key, value in (
        ("deviceID", obj.get("deviceID")),
        ("pciBusID", obj.get("pciBusID")),
        ("runtimeConfig.deviceID", (runtime or {}).get("deviceID")),
    ):
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not pci.is_pci_address(value):
            raise _bad(key, value, "expected a PCI address such as 0000:00:0a.0")
        candidates.append((key, pci.normalize(value)))
    addrs = sorted({a for _, a in candidates})
    if len(addrs) > 1:
        raise CniError(
            E_INVALID_CONFIG,
            "invalid network configuration: conflicting device IDs",
            "; ".join(f"{k}={a}" for k, a in candidates),
        )
    pci_address = addrs[0] if addrs else None

    device = _opt_str(obj, "device")
    if device is not None:
        why = valid_ifname(device)
        if why:
            raise _bad("device", device, f"expected a host interface name; it {why}")
    hwaddr = _opt_str(obj, "hwaddr")
    if hwaddr is not None:
        if not _MAC.match(hwaddr):
            raise _bad("hwaddr", hwaddr, "expected a MAC address such as 52:54:00:12:34:56")
        hwaddr = hwaddr.lower()
    mtu = obj.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or mtu < 68):
        raise _bad("mtu", mtu, "expected an integer MTU of at least 68")
    if isinstance(mtu, int) and mtu > 65535:
        raise _bad("mtu", mtu, "expected an integer MTU of at most 65535")
    # The `mac` capability (CNI CONVENTIONS.md; Multus fills it from the pod's network
    # selection) overrides the config's own `mac`, as in the tuning and sriov plugins.
    mac_key = "mac"
    mac = _opt_str(obj, "mac")
    runtime_mac = (runtime or {}).get("mac")
    if runtime_mac is not None and not isinstance(runtime_mac, str):
        raise _bad("runtimeConfig.mac", runtime_mac, "expected a string")
    if runtime_mac:
        mac_key, mac = "runtimeConfig.mac", runtime_mac
    if mac is not None:
        if not _MAC.match(mac):
            raise _bad(mac_key, mac, "expected a MAC address such as 02:00:00:00:00:01")
        mac = mac.lower()
    dns = obj.get("dns")
    if dns is None:
        dns = {}
    if not isinstance(dns, dict):
        raise _bad("dns", dns, "expected an object (nameservers, domain, search, options)")

    ipam = obj.get("ipam")
    ipam_type = None
    if ipam is not None and ipam != {}:
        if not isinstance(ipam, dict):
            raise _bad("ipam", ipam, "expected an object with a type")
        ipam_type = ipam.get("type")
        if not isinstance(ipam_type, str) or not ipam_type or "/" in ipam_type:
            raise _bad("ipam.type", ipam_type, "expected the IPAM plugin's file name")

    log_level = obj.get("logLevel", policy.log_level)
    if log_level not in _LOG_LEVELS:
        raise _bad("logLevel", log_level, f"expected one of {', '.join(_LOG_LEVELS)}")
    lock_timeout = obj.get("lockTimeout", 10)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
        raise _bad("lockTimeout", lock_timeout, "expected seconds (a number)")
    if lock_timeout < 0:
        raise _bad("lockTimeout", lock_timeout, "expected seconds (a number, 0 or more)")
    prev = obj.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _bad("prevResult", prev, "expected a result object")
    return Conf(
        cni_version=cni_version,
        name=name,
        type=ptype,
        pci_address=pci_address,
        device=device,
        hwaddr=hwaddr,
        mtu=mtu,
        mac=mac,
        ipam_type=ipam_type,
        sysfs_root=policy.sysfs_root,
        log_file=policy.log_file,
        log_level=log_level,
        lock_timeout=float(lock_timeout),
        prev_result=prev,
        dns=dns,
        policy=policy,
        raw=obj,
    )
