"""Where a NIC is now: in the host namespace (under which name), in some other namespace where
ehost-device plumbed it (which, under which name), or nowhere to be found.

Built once per run from discovery (what the host namespace sees) and a scan of every namespace
for ehost-device's mark, then asked per device ID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from virtcore import discovery, pci, plumbed

HOST = "host"  # the netdev is in the host namespace
POD = "pod"  # found by ehost-device's mark in another namespace
MISSING = "missing"  # the PCI function is on this node, its netdev is nowhere to be found
ABSENT = "absent"  # no virtio NIC on this node has that PCI address
UNKNOWN = "unknown"  # discovery failed: only a mark found elsewhere could place it
LOCATIONS = (HOST, POD, MISSING, ABSENT, UNKNOWN)


@dataclass(frozen=True)
class Place:
    location: str  # one of LOCATIONS
    netns: Optional[str] = None  # namespace label ("host", a netns name, "pid:123(pause)")
    netns_path: Optional[str] = None
    ifname: Optional[str] = None  # its name where it is
    host_ifname: Optional[str] = None  # its name on the host (now, or before it was moved)
    numa_node: Optional[int] = None  # from sysfs; None when unknown
    note: Optional[str] = None


class Locator:
    def __init__(
        self,
        nics: Sequence[discovery.Nic],
        scan: plumbed.Scan,
        host_inode: Optional[int],
        *,
        discovered: bool = True,
    ) -> None:
        self.discovered = discovered
        self.nics = {n.pci_address: n for n in nics}
        self.host_inode = host_inode
        self.marked: Dict[str, List[plumbed.PlumbedNic]] = {}
        for p in scan.nics:
            try:
                addr = pci.normalize(p.pci_address)
            except pci.PCIAddressError:
                continue
            self.marked.setdefault(addr, []).append(p)

    def _is_host(self, ns: plumbed.Namespace) -> bool:
        if self.host_inode is not None:
            return ns.inode == self.host_inode
        return ns.is_current

    def place(self, device_id: str) -> Place:
        if not pci.is_pci_address(device_id):
            return Place(ABSENT, note="device ID is not a PCI address (not a virtio NIC)")
        addr = pci.normalize(device_id)
        nic = self.nics.get(addr)
        numa = nic.numa_node if nic is not None and (nic.numa_node or 0) >= 0 else None
        marks = self.marked.get(addr, [])
        away = [m for m in marks if not self._is_host(m.netns)]
        here = [m for m in marks if self._is_host(m.netns)]
        if away:
            m = away[0]
            note = None
            if len(away) > 1:
                others = ", ".join(f"{o.netns.label}/{o.ifname}" for o in away[1:])
                note = f"marked links for this PCI address in several namespaces: also {others}"
            elif nic is None:
                note = "its PCI function is not in sysfs"
            return Place(
                POD,
                netns=m.netns.label,
                netns_path=m.netns.path,
                ifname=m.ifname,
                host_ifname=m.host_ifname,
                numa_node=numa,
                note=note,
            )
        if not self.discovered:
            return Place(UNKNOWN, note="discovery failed")
        if nic is None:
            return Place(ABSENT, note="no virtio NIC with this PCI address on this node")
        if nic.visible:
            note = None
            if here:
                note = "carries ehost-device's mark in the host namespace (an unfinished DEL?)"
            return Place(
                HOST,
                netns=HOST,
                ifname=nic.ifname,
                host_ifname=nic.ifname,
                numa_node=numa,
                note=note,
            )
        why = "netdev neither in the host namespace nor found with ehost-device's mark"
        if nic.driver is None:
            why = "no driver bound to its virtio device (no netdev)"
        return Place(MISSING, numa_node=numa, note=why)


def host_inode(netns_path: Optional[str]) -> Optional[int]:
    """Inode of the namespace discovery reads as the host's (None = this process's own)."""
    if netns_path is None:
        return None
    try:
        return os.stat(netns_path).st_ino
    except OSError:
        return None


def build(
    sysfs_root: str,
    *,
    netns: Optional[str],
    netns_dir: str,
    proc_root: str,
) -> Tuple[Locator, List[str]]:
    """Discovery in the host namespace plus the namespace scan; problems as lines."""
    problems: List[str] = []
    discovered = True
    try:
        nics = discovery.discover(sysfs_root, netns=netns)
    except discovery.DiscoveryError as e:
        nics, discovered = [], False
        problems.append(f"discovery failed, host-side NIC locations unknown: {e}")
    scan = plumbed.scan(netns_dir, proc_root)
    problems.extend(scan.problems)
    return Locator(nics, scan, host_inode(netns), discovered=discovered), problems
