"""The node-local record of DRA claims: which prepared claim holds which NICs, for which pods,
and the network status of each NIC once plumbed.

Two kinds of file under one directory (`DEFAULT_DIR`, the daemon's `--dra-state-dir`):

- `claims.json`, written only by virtdp-serve when the kubelet prepares or unprepares a claim,
  read by ehost-device (which NICs a pod's claims hold) and virtdp-inspect:

      {"version": 1, "driver": "virt.kernel.org", "node": "<node>", "claims": [
         {"uid", "namespace", "name",
          "pods": [{"uid", "namespace", "name"}],              # the claim's status.reservedFor
          "devices": [{"request", "pool", "device", "pciAddress", "interfaceName": str|null}]}]}

- `status/<claim uid>_<device>.json`, written by ehost-device after a successful ADD and removed
  on DEL; the daemon copies it into the claim's `status.devices[]` (`networkData`).

Rules this module keeps: every write is atomic (a temp file in the same directory, fsync,
rename, fsync of the directory), so a reader sees the old file or the new one, never half of
one; a file that is not what it should be is a ClaimRecordError naming the file, the key and
what was expected; removing what is already gone is success. Stdlib only, Python 3.9 syntax:
ehost-device imports it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from virtcore import pci

DEFAULT_DIR = "/var/lib/virtdp/dra"
DEFAULT_DRIVER = "virt.kernel.org"
CLAIMS_FILE = "claims.json"
STATUS_DIR = "status"
VERSION = 1
FILE_MODE = 0o644
DIR_MODE = 0o755

# Far larger than the record of any node; a bigger file is not one.
_MAX_BYTES = 16 * 1024 * 1024
_JSON = ".json"
# Object UIDs are UUIDs; anything safe as a file-name part is accepted, nothing with a '/'.
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,127}$")
# A DRA device name is a DNS label (RFC 1123): no '_', so `<uid>_<device>` splits unambiguously.
_DEVICE_NAME = re.compile(r"^pci-([0-9a-f]{4})-([0-9a-f]{2})-([0-9a-f]{2})-([0-7])$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ClaimRecordError(ValueError):
    """A claim record or status file that is unreadable or not in the expected shape."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        self.source = source
        self.key_path = key_path
        where = f"{source}: {key_path}: " if key_path else f"{source}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class PodRef:
    uid: str
    namespace: str
    name: str


@dataclass(frozen=True)
class ClaimedDevice:
    request: str  # the claim's request name (results[].request)
    pool: str
    device: str  # the DRA device name, device_name(pci_address)
    pci_address: str
    interface_name: Optional[str]  # from the claim's opaque config; None: ehost-device picks


@dataclass(frozen=True)
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    driver: str
    pods: Tuple[PodRef, ...]
    devices: Tuple[ClaimedDevice, ...]


@dataclass(frozen=True)
class DeviceStatus:
    """One plumbed NIC of a claim, as ehost-device saw it after ADD."""

    claim_uid: str
    claim_namespace: str
    claim_name: str
    driver: str
    pool: str
    device: str
    pod_uid: str
    container_id: str
    if_name: str  # CNI_IFNAME of the call
    interface_name: str  # networkData.interfaceName: the name inside the pod
    ips: Tuple[str, ...]  # CIDR, e.g. "198.51.100.2/24"
    hardware_address: str


def device_name(pci_address: str) -> str:
    """The DRA device name of a NIC: "0000:00:04.0" -> "pci-0000-00-04-0" (a DNS label)."""
    address = pci.normalize(pci_address)
    return "pci-" + address.replace(":", "-").replace(".", "-")


def pci_address_of(device: str) -> Optional[str]:
    """The PCI address a DRA device name stands for ("pci-0000-00-04-0" -> "0000:00:04.0"),
    None for a name `device_name` does not make."""
    m = _DEVICE_NAME.match(device)
    return f"{m[1]}:{m[2]}:{m[3]}.{m[4]}" if m else None


def is_uid(text: object) -> bool:
    """An object UID as the record accepts it (a UUID, or any file-name-safe token)."""
    return isinstance(text, str) and bool(_UID.match(text))


def ifname_problem(name: object) -> Optional[str]:
    """Why `name` cannot be a Linux interface name, or None (the kernel's dev_valid_name)."""
    if not isinstance(name, str):
        return f"is {type(name).__name__}, expected a string"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if len(name.encode()) > 15:
        return f"is {len(name.encode())} bytes long (at most 15)"
    if any(c in name for c in "/:") or any(c.isspace() for c in name):
        return "must not contain '/', ':' or whitespace"
    return None


# --- claims.json -------------------------------------------------------------------------------


def claims_path(directory: str) -> str:
    return os.path.join(directory, CLAIMS_FILE)


def load(directory: str = DEFAULT_DIR) -> Dict[str, PreparedClaim]:
    """The prepared claims by UID. No file (nothing prepared yet) is an empty record."""
    path = claims_path(directory)
    doc = _read_json(path, "a claim record", missing_ok=True)
    if doc is None:
        return {}
    return parse(doc, path)


def parse(doc: Any, source: str) -> Dict[str, PreparedClaim]:
    """Validate a claims.json document (already decoded)."""
    if not isinstance(doc, dict):
        raise ClaimRecordError(source, "", f"top level is {_kind(doc)}, expected an object")
    version = doc.get("version")
    if version != VERSION:
        raise ClaimRecordError(
            source, "version", f"{version!r}, expected {VERSION} (written by another virtdp?)"
        )
    driver = _string(doc, "driver", source, "")
    _string(doc, "node", source, "")
    items = doc.get("claims")
    if not isinstance(items, list):
        raise ClaimRecordError(source, "claims", f"is {_kind(items)}, expected a list")
    out: Dict[str, PreparedClaim] = {}
    for i, item in enumerate(items):
        claim = _parse_claim(item, driver, source, f"claims[{i}]")
        if claim.uid in out:
            raise ClaimRecordError(
                source, f"claims[{i}].uid", f"{claim.uid!r} appears twice, expected unique UIDs"
            )
        out[claim.uid] = claim
    return out


def save(
    directory: str,
    claims: Union[Mapping[str, PreparedClaim], Iterable[PreparedClaim]],
    *,
    driver: str,
    node: str,
) -> str:
    """Replace the record atomically with `claims`; returns the file's path."""
    values = list(claims.values()) if isinstance(claims, Mapping) else list(claims)
    seen = set()
    for c in values:
        if c.driver != driver:
            raise ValueError(f"claim {c.namespace}/{c.name} is of driver {c.driver}, not {driver}")
        if c.uid in seen:
            raise ValueError(f"claim UID {c.uid} given twice")
        seen.add(c.uid)
    values.sort(key=lambda c: (c.namespace, c.name, c.uid))
    doc = {
        "version": VERSION,
        "driver": driver,
        "node": node,
        "claims": [_claim_to_dict(c) for c in values],
    }
    # Validate what is written with the reader's rules: a record load() refuses is never saved.
    parse(json.loads(json.dumps(doc)), "claims to save")
    path = claims_path(directory)
    _write_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def for_pod(
    claims: Mapping[str, PreparedClaim], pod_uid: str
) -> List[Tuple[PreparedClaim, ClaimedDevice]]:
    """Every NIC of every claim reserved for the pod, ordered by claim (namespace, name), then
    request, then device: the order in which a pod's NICs are named net1, net2, ..."""
    out: List[Tuple[PreparedClaim, ClaimedDevice]] = []
    for claim in claims.values():
        if any(p.uid == pod_uid for p in claim.pods):
            out.extend((claim, d) for d in claim.devices)
    out.sort(key=lambda cd: (cd[0].namespace, cd[0].name, cd[0].uid, cd[1].request, cd[1].device))
    return out


def _parse_claim(item: Any, driver: str, source: str, key: str) -> PreparedClaim:
    if not isinstance(item, dict):
        raise ClaimRecordError(source, key, f"is {_kind(item)}, expected an object")
    uid = _uid(item, "uid", source, key)
    namespace = _string(item, "namespace", source, key)
    name = _string(item, "name", source, key)
    pods_raw = item.get("pods")
    if not isinstance(pods_raw, list):
        raise ClaimRecordError(source, f"{key}.pods", f"is {_kind(pods_raw)}, expected a list")
    pods = []
    for j, p in enumerate(pods_raw):
        pkey = f"{key}.pods[{j}]"
        if not isinstance(p, dict):
            raise ClaimRecordError(source, pkey, f"is {_kind(p)}, expected an object")
        pods.append(
            PodRef(
                uid=_uid(p, "uid", source, pkey),
                namespace=_string(p, "namespace", source, pkey),
                name=_string(p, "name", source, pkey),
            )
        )
    devs_raw = item.get("devices")
    if not isinstance(devs_raw, list):
        raise ClaimRecordError(source, f"{key}.devices", f"is {_kind(devs_raw)}, expected a list")
    devices = []
    seen = set()
    for j, d in enumerate(devs_raw):
        dev = _parse_device(d, source, f"{key}.devices[{j}]")
        if (dev.request, dev.pool, dev.device) in seen:
            raise ClaimRecordError(
                source,
                f"{key}.devices[{j}]",
                f"{dev.request}/{dev.pool}/{dev.device} appears twice, expected each once",
            )
        seen.add((dev.request, dev.pool, dev.device))
        devices.append(dev)
    return PreparedClaim(
        uid=uid,
        namespace=namespace,
        name=name,
        driver=driver,
        pods=tuple(pods),
        devices=tuple(devices),
    )


def _parse_device(d: Any, source: str, key: str) -> ClaimedDevice:
    if not isinstance(d, dict):
        raise ClaimRecordError(source, key, f"is {_kind(d)}, expected an object")
    request = _string(d, "request", source, key)
    pool = _string(d, "pool", source, key)
    device = _string(d, "device", source, key)
    address = d.get("pciAddress")
    if not pci.is_pci_address(address):
        raise ClaimRecordError(
            source, f"{key}.pciAddress", f"{address!r}, expected a PCI address like 0000:00:04.0"
        )
    assert isinstance(address, str)
    address = pci.normalize(address)
    if device != device_name(address):
        raise ClaimRecordError(
            source,
            f"{key}.device",
            f"{device!r} does not name pciAddress {address}, expected {device_name(address)!r}",
        )
    ifname = d.get("interfaceName")
    if ifname is not None:
        why = ifname_problem(ifname)
        if why:
            raise ClaimRecordError(
                source,
                f"{key}.interfaceName",
                f"{ifname!r} {why}; expected an interface name or null",
            )
    return ClaimedDevice(
        request=request, pool=pool, device=device, pci_address=address, interface_name=ifname
    )


def _claim_to_dict(c: PreparedClaim) -> Dict[str, Any]:
    return {
        "uid": c.uid,
        "namespace": c.namespace,
        "name": c.name,
        "pods": [{"uid": p.uid, "namespace": p.namespace, "name": p.name} for p in c.pods],
        "devices": [
            {
                "request": d.request,
                "pool": d.pool,
                "device": d.device,
                "pciAddress": d.pci_address,
                "interfaceName": d.interface_name,
            }
            for d in c.devices
        ],
    }


# --- status/<claim uid>_<device>.json -----------------------------------------------------------


def status_dir(directory: str) -> str:
    return os.path.join(directory, STATUS_DIR)


def status_path(directory: str, claim_uid: str, device: str) -> str:
    if not _UID.match(claim_uid):
        raise ValueError(f"claim UID {claim_uid!r} is not a UID")
    if not _DNS_LABEL.match(device):
        raise ValueError(f"device {device!r} is not a DRA device name (a DNS label)")
    return os.path.join(status_dir(directory), f"{claim_uid}_{device}{_JSON}")


def status_key(file_name: str) -> Optional[Tuple[str, str]]:
    """(claim uid, device) of a status file's base name, or None for any other file (temp files
    start with a dot)."""
    if file_name.startswith(".") or not file_name.endswith(_JSON):
        return None
    uid, sep, device = file_name[: -len(_JSON)].rpartition("_")
    if not sep or not _UID.match(uid) or not _DNS_LABEL.match(device):
        return None
    return uid, device


def write_status(directory: str, status: DeviceStatus) -> str:
    """Write (or replace) the status file of one plumbed NIC atomically; returns its path."""
    path = status_path(directory, status.claim_uid, status.device)
    doc = _status_to_dict(status)
    _parse_status(json.loads(json.dumps(doc)), "status to write")
    _write_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def remove_status(directory: str, claim_uid: str, device: str) -> bool:
    """Remove a status file; True if there was one. Already gone is success."""
    path = status_path(directory, claim_uid, device)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_dir(os.path.dirname(path))
    return True


def read_status(path: str) -> DeviceStatus:
    doc = _read_json(path, "a claim device status", missing_ok=False)
    status = _parse_status(doc, path)
    key = status_key(os.path.basename(path))
    if key is not None and key != (status.claim_uid, status.device):
        raise ClaimRecordError(
            path,
            "claim.uid",
            f"file is named for {key[0]}/{key[1]} but holds {status.claim_uid}/{status.device}",
        )
    return status


def load_statuses(
    directory: str = DEFAULT_DIR, *, errors: Optional[List[ClaimRecordError]] = None
) -> List[DeviceStatus]:
    """Every status file, in file-name order. A malformed file raises ClaimRecordError, or, when
    `errors` is given, is appended there and skipped. A file that vanishes meanwhile is skipped."""
    sdir = status_dir(directory)
    try:
        names = sorted(os.listdir(sdir))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if status_key(name) is None:
            continue
        try:
            out.append(read_status(os.path.join(sdir, name)))
        except FileNotFoundError:
            continue
        except ClaimRecordError as e:
            if errors is None:
                raise
            errors.append(e)
    return out


def _status_to_dict(s: DeviceStatus) -> Dict[str, Any]:
    return {
        "claim": {"uid": s.claim_uid, "namespace": s.claim_namespace, "name": s.claim_name},
        "driver": s.driver,
        "pool": s.pool,
        "device": s.device,
        "podUID": s.pod_uid,
        "containerID": s.container_id,
        "ifName": s.if_name,
        "networkData": {
            "interfaceName": s.interface_name,
            "ips": list(s.ips),
            "hardwareAddress": s.hardware_address,
        },
    }


def _parse_status(doc: Any, source: str) -> DeviceStatus:
    if not isinstance(doc, dict):
        raise ClaimRecordError(source, "", f"top level is {_kind(doc)}, expected an object")
    claim = doc.get("claim")
    if not isinstance(claim, dict):
        raise ClaimRecordError(source, "claim", f"is {_kind(claim)}, expected an object")
    device = _string(doc, "device", source, "")
    if not _DNS_LABEL.match(device):
        raise ClaimRecordError(source, "device", f"{device!r}, expected a DNS label")
    net = doc.get("networkData")
    if not isinstance(net, dict):
        raise ClaimRecordError(source, "networkData", f"is {_kind(net)}, expected an object")
    ips_raw = net.get("ips")
    if not isinstance(ips_raw, list):
        raise ClaimRecordError(source, "networkData.ips", f"is {_kind(ips_raw)}, expected a list")
    ips = []
    for i, ip in enumerate(ips_raw):
        try:
            if not isinstance(ip, str) or "/" not in ip:
                raise ValueError
            ipaddress.ip_interface(ip)
        except ValueError:
            raise ClaimRecordError(
                source, f"networkData.ips[{i}]", f"{ip!r}, expected CIDR like 198.51.100.2/24"
            ) from None
        ips.append(ip)
    hw = net.get("hardwareAddress")
    if not isinstance(hw, str):
        raise ClaimRecordError(
            source, "networkData.hardwareAddress", f"is {_kind(hw)}, expected a string"
        )
    ifname = net.get("interfaceName")
    why = ifname_problem(ifname)
    if why:
        raise ClaimRecordError(
            source, "networkData.interfaceName", f"{ifname!r} {why}; expected an interface name"
        )
    assert isinstance(ifname, str)
    return DeviceStatus(
        claim_uid=_uid(claim, "uid", source, "claim"),
        claim_namespace=_string(claim, "namespace", source, "claim"),
        claim_name=_string(claim, "name", source, "claim"),
        driver=_string(doc, "driver", source, ""),
        pool=_string(doc, "pool", source, ""),
        device=device,
        pod_uid=_uid(doc, "podUID", source, ""),
        container_id=_string(doc, "containerID", source, ""),
        if_name=_string(doc, "ifName", source, ""),
        interface_name=ifname,
        ips=tuple(ips),
        hardware_address=hw,
    )


# --- files ---------------------------------------------------------------------------------------


def _read_json(path: str, what: str, *, missing_ok: bool) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except IsADirectoryError:
        raise ClaimRecordError(path, "", f"is a directory, expected {what} (JSON)") from None
    except OSError as e:
        raise ClaimRecordError(path, "", f"cannot read: {e.strerror or e}") from None
    if len(raw) > _MAX_BYTES:
        raise ClaimRecordError(path, "", f"larger than {_MAX_BYTES} bytes, not {what}")
    if not raw.strip():
        raise ClaimRecordError(path, "", f"is empty, expected {what} (JSON)")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ClaimRecordError(path, "", f"not UTF-8 (byte {e.start}), expected {what}") from None
    except json.JSONDecodeError as e:
        raise ClaimRecordError(
            path, "", f"not JSON ({e.msg} at line {e.lineno} column {e.colno}), expected {what}"
        ) from None


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(value: Any) -> str:
    return "missing" if value is None else type(value).__name__


def _string(obj: Dict[str, Any], field: str, source: str, key: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not value:
        where = f"{key}.{field}" if key else field
        raise ClaimRecordError(source, where, f"{value!r}, expected a non-empty string")
    return value


def _uid(obj: Dict[str, Any], field: str, source: str, key: str) -> str:
    value = _string(obj, field, source, key)
    if not _UID.match(value):
        where = f"{key}.{field}" if key else field
        raise ClaimRecordError(
            source, where, f"{value!r}, expected a UID (letters, digits, '-', '.')"
        )
    return value
