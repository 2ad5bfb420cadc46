"""Device-info files (device-info-spec v1.1.0) that a device plugin leaves for Multus.

For every allocated device the plugin writes
`<dir>/<resourceName with "/" → "-">-<deviceID with "/" → "-">-device.json`, mode 0444, e.g.
`{"type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:00:0a.0"}}`. Multus reads it
by resource name and device ID and copies it into the pod's network-status. The plugin creates
the directory and removes its own files when it stops. This module owns the file name, the
format, and writing (atomic: readers never see half a file), reading and removing them.
Stdlib only.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from virtcore import pci

DEFAULT_DIR = "/var/run/k8s.cni.cncf.io/devinfo/dp"
SPEC_VERSION = "1.1.0"
TYPE_PCI = "pci"
FILE_MODE = 0o444
_SUFFIX = "-device.json"


class DevInfoError(ValueError):
    """A device-info file that is missing, unreadable or not what the spec describes."""


@dataclass(frozen=True)
class DeviceInfo:
    """The parts of a device-info document virtdp writes and reads."""

    pci_address: str
    type: str = TYPE_PCI
    version: str = SPEC_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return {
            "type": self.type,
            "version": self.version,
            "pci": {"pci-address": self.pci_address},
        }


def file_name(resource_name: str, device_id: str) -> str:
    """The file name Multus looks for (`network-attachment-definition-client` convention)."""
    if not resource_name or not device_id:
        raise ValueError(
            f"resource name and device ID must be non-empty, got {resource_name!r}, {device_id!r}"
        )
    return f"{resource_name.replace('/', '-')}-{device_id.replace('/', '-')}{_SUFFIX}"


def path_for(directory: str, resource_name: str, device_id: str) -> str:
    return os.path.join(directory, file_name(resource_name, device_id))


def write(directory: str, resource_name: str, pci_address: str) -> str:
    """Write (or replace) the file for one PCI device; returns its path.

    The directory is created when missing. The file appears atomically with mode 0444, so a
    reader sees either the old complete file or the new one.
    """
    address = pci.normalize(pci_address)
    os.makedirs(directory, exist_ok=True)
    final = path_for(directory, resource_name, address)
    data = json.dumps(DeviceInfo(pci_address=address).to_dict(), sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".devinfo-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    return final


def parse(text: str, source: str) -> DeviceInfo:
    """Validate a device-info document; DevInfoError names the file and what was expected."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise DevInfoError(f"{source}: not JSON ({e}), expected a device-info object") from None
    if not isinstance(doc, dict):
        raise DevInfoError(f"{source}: top level is {type(doc).__name__}, expected an object")
    version = doc.get("version")
    if not isinstance(version, str) or not version:
        raise DevInfoError(f"{source}: version: missing, expected a string such as {SPEC_VERSION}")
    dtype = doc.get("type")
    if dtype != TYPE_PCI:
        raise DevInfoError(f"{source}: type: {dtype!r}, expected {TYPE_PCI!r}")
    body = doc.get("pci")
    if not isinstance(body, dict):
        raise DevInfoError(f"{source}: pci: missing, expected an object with pci-address")
    address = body.get("pci-address")
    if not pci.is_pci_address(address):
        raise DevInfoError(
            f"{source}: pci.pci-address: {address!r}, expected a PCI address like 0000:00:0a.0"
        )
    assert isinstance(address, str)
    return DeviceInfo(pci_address=pci.normalize(address), type=dtype, version=version)


def read(path: str) -> DeviceInfo:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DevInfoError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse(text, path)


def load(directory: str, resource_name: str, device_id: str) -> Optional[DeviceInfo]:
    """The file for this device, or None when there is none."""
    path = path_for(directory, resource_name, device_id)
    if not os.path.lexists(path):
        return None
    return read(path)


def remove_path(path: str) -> bool:
    """Remove one file; True if it was there. Already gone is success."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def remove(directory: str, resource_name: str, device_id: str) -> bool:
    return remove_path(path_for(directory, resource_name, device_id))


def list_files(directory: str, resource_name: Optional[str] = None) -> List[str]:
    """Device-info files in `directory` (of one resource when given), sorted; [] if absent."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not n.endswith(_SUFFIX) or n.startswith("."):
            continue
        if resource_name is not None:
            # "kernel.org-virt-" also prefixes "kernel.org-virt-fast-...": the rest must be
            # exactly a device ID (a PCI address for virtdp) for the file to be this resource's.
            prefix = resource_name.replace("/", "-") + "-"
            if not (n.startswith(prefix) and pci.is_pci_address(n[len(prefix) : -len(_SUFFIX)])):
                continue
        out.append(os.path.join(directory, n))
    return sorted(out)
