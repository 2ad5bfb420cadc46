"""Reading the virtio PCI tree from sysfs: which PCI functions are virtio NICs, and their netdevs.

Everything takes a `sysfs_root` (default `/sys`) so a captured or fake tree can be read the same
way. Nothing here raises on a damaged tree: what cannot be read is recorded in `problems`.
This module is on ehost-device's start path: stdlib only, Python 3.9+.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from virtcore import pci

VIRTIO_VENDOR = "0x1af4"
# PCI device IDs of virtio network functions: transitional (legacy) and modern.
VIRTIO_NET_PCI_DEVICES = {"0x1000": "legacy", "0x1041": "modern"}
# Virtio device type of a network device, as in /sys/bus/virtio/devices/virtioN/device.
VIRTIO_ID_NET = 1


class DeviceNotFound(LookupError):
    """No PCI function with that address in this sysfs tree."""


@dataclass(frozen=True)
class VirtioNic:
    """One virtio network PCI function as sysfs shows it in the reading namespace."""

    pci_address: str
    virtio_name: Optional[str] = None  # "virtio3": the virtio device the function owns
    vendor: Optional[str] = None  # "0x1af4"
    device: Optional[str] = None  # "0x1000" or "0x1041"
    pci_driver: Optional[str] = None  # "virtio-pci"
    driver: Optional[str] = None  # driver of the virtio device: "virtio_net"
    numa_node: Optional[int] = None  # None when unknown; the kernel's -1 is kept as -1
    netdevs: Tuple[str, ...] = ()  # names under virtioN/net/ (empty when moved away)
    problems: Tuple[str, ...] = field(default=())  # what could not be read

    @property
    def model(self) -> Optional[str]:
        return VIRTIO_NET_PCI_DEVICES.get(self.device or "")


def _read(path: str, problems: List[str], what: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        problems.append(f"cannot read {what}: {e.strerror or e}")
        return None


def _link_name(path: str, problems: List[str], what: str, required: bool = True) -> Optional[str]:
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        if required:
            problems.append(f"no {what}")
        return None
    except OSError as e:
        problems.append(f"cannot read {what}: {e.strerror or e}")
        return None
    if not os.path.exists(path):
        problems.append(f"{what} is a broken link")
    return os.path.basename(target.rstrip("/"))


def _virtio_children(func_dir: str) -> List[str]:
    try:
        names = os.listdir(func_dir)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("virtio") and n[6:].isdigit())


def _virtio_type(vdir: str) -> Optional[int]:
    try:
        with open(os.path.join(vdir, "device")) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return None


def read_function(sysfs_root: str, pci_address: str) -> VirtioNic:
    """Read one PCI function. Raises DeviceNotFound if the tree has no such function.

    The caller decides whether it is a virtio NIC (`vendor`, `device`, `driver`).
    """
    addr = pci.normalize(pci_address)
    func_dir = os.path.join(sysfs_root, "bus", "pci", "devices", addr)
    if not os.path.lexists(func_dir):
        raise DeviceNotFound(f"no PCI device {addr} in {sysfs_root}/bus/pci/devices")
    problems: List[str] = []
    if not os.path.exists(func_dir):
        problems.append("PCI device link is broken")
        return VirtioNic(pci_address=addr, problems=tuple(problems))
    vendor = _read(os.path.join(func_dir, "vendor"), problems, "PCI vendor")
    device = _read(os.path.join(func_dir, "device"), problems, "PCI device ID")
    pci_driver = _link_name(os.path.join(func_dir, "driver"), problems, "PCI driver", False)
    numa: Optional[int] = None
    raw = _read(os.path.join(func_dir, "numa_node"), problems, "numa_node")
    if raw is not None:
        try:
            numa = int(raw)
        except ValueError:
            problems.append(f"numa_node is not a number: {raw!r}")
    children = [
        c
        for c in _virtio_children(func_dir)
        if _virtio_type(os.path.join(func_dir, c)) in (VIRTIO_ID_NET, None)
    ]
    virtio_name = children[0] if children else None
    driver = None
    netdevs: Tuple[str, ...] = ()
    if virtio_name is None:
        if vendor == VIRTIO_VENDOR:
            problems.append("no virtio device under the PCI function (virtio-pci not bound?)")
    else:
        vdir = os.path.join(func_dir, virtio_name)
        driver = _link_name(os.path.join(vdir, "driver"), problems, "virtio driver", False)
        if driver is None and not any("virtio driver" in p for p in problems):
            problems.append("no driver bound to the virtio device")
        try:
            netdevs = tuple(sorted(os.listdir(os.path.join(vdir, "net"))))
        except FileNotFoundError:
            netdevs = ()
        except OSError as e:
            problems.append(f"cannot list netdevs: {e.strerror or e}")
    return VirtioNic(
        pci_address=addr,
        virtio_name=virtio_name,
        vendor=vendor,
        device=device,
        pci_driver=pci_driver,
        driver=driver,
        numa_node=numa,
        netdevs=netdevs,
        problems=tuple(problems),
    )


def _owning_function(path: str) -> Optional[str]:
    """The PCI address of the function that owns the virtio device at `path` (its parent)."""
    try:
        # The bus link's own target names the parent: one readlink instead of resolving the
        # whole (deep, behind root ports) path component by component.
        target = os.readlink(path)
    except OSError:
        target = os.path.realpath(path)
    parent = os.path.basename(os.path.dirname(target.rstrip("/")))
    return pci.normalize(parent) if pci.is_pci_address(parent) else None


def scan(sysfs_root: str = "/sys") -> List[VirtioNic]:
    """Every virtio network PCI function, found from both the virtio and the PCI bus.

    A function whose netdev is in another network namespace is still listed (empty `netdevs`).
    Sorted by PCI address.
    """
    found = set()
    vbus = os.path.join(sysfs_root, "bus", "virtio", "devices")
    try:
        vnames = os.listdir(vbus)
    except OSError:
        vnames = []
    for name in vnames:
        vpath = os.path.join(vbus, name)
        if _virtio_type(vpath) not in (VIRTIO_ID_NET,):
            continue
        addr = _owning_function(vpath)
        if addr:
            found.add(addr)
    pbus = os.path.join(sysfs_root, "bus", "pci", "devices")
    try:
        pnames = os.listdir(pbus)
    except OSError:
        pnames = []
    for name in pnames:
        if not pci.is_pci_address(name):
            continue
        try:
            with open(os.path.join(pbus, name, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(pbus, name, "device")) as f:
                device = f.read().strip()
        except OSError:
            # A function whose IDs cannot be read is only listed if the virtio bus named it.
            continue
        if vendor == VIRTIO_VENDOR and device in VIRTIO_NET_PCI_DEVICES:
            found.add(pci.normalize(name))
    out = []
    for addr in sorted(found):
        try:
            out.append(read_function(sysfs_root, addr))
        except DeviceNotFound:
            out.append(
                VirtioNic(
                    pci_address=addr,
                    problems=("listed on the virtio bus but not " "on the PCI bus",),
                )
            )
    return out


def read_virtio_nic(sysfs_root: str, pci_address: str) -> Optional[VirtioNic]:
    """One function as `scan` would list it, or None when `scan` would not list it (gone, or
    not a virtio network function): the single-device read behind event-driven updates."""
    try:
        fn = read_function(sysfs_root, pci_address)
    except DeviceNotFound:
        return None
    if fn.virtio_name is not None:
        return fn
    if fn.vendor == VIRTIO_VENDOR and fn.device in VIRTIO_NET_PCI_DEVICES:
        return fn
    return None


def netdev_pci_address(sysfs_root: str, ifname: str) -> Optional[str]:
    """The PCI address owning `/sys/class/net/<ifname>`, or None for a non-PCI netdev.

    Behind root ports and bridges the path holds several addresses: the NIC's is the nearest
    one above `virtioN` (or above `net/` for a NIC whose driver binds the PCI function itself).
    """
    path = os.path.join(sysfs_root, "class", "net", ifname)
    try:
        # The netdev may leave while we look (moved into a pod): realpath's readlink then fails.
        if not os.path.exists(path):
            return None
        real = os.path.realpath(path)
    except OSError:
        return None
    parts = real.split(os.sep)
    # .../<bdf>/virtioN/net/<ifname> or .../<bdf>/net/<ifname>
    for part in reversed(parts[:-2]):
        if pci.is_pci_address(part):
            return pci.normalize(part)
    return None


_PCI_ROOT = re.compile(r"^pci[0-9a-f]{4}:[0-9a-f]{2}$")


def pcie_root(sysfs_root: str, pci_address: str) -> Optional[str]:
    """The PCI root complex the function sits under, as sysfs names it ("pci0000:00"): the
    value of Kubernetes' standard `resource.kubernetes.io/pcieRoot` device attribute. None when
    the function is gone or its path names no root (one readlink, no path walk)."""
    path = os.path.join(sysfs_root, "bus", "pci", "devices", pci.normalize(pci_address))
    try:
        target = os.readlink(path)
    except OSError:
        return None
    for part in target.split(os.sep):
        if _PCI_ROOT.match(part):
            return part
    return None
