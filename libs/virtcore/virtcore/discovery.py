"""The node's virtio NIC inventory: PCI facts from sysfs joined with link state and default
routes from netlink, and whether each NIC may be handed to pods (and if not, why).

The inventory comes from the PCI and virtio buses, so a NIC whose netdev was moved into a pod's
namespace is still listed, as not visible here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from virtcore import netlink, sysfs


class DiscoveryError(RuntimeError):
    """Discovery could not run at all (no sysfs tree, namespace or netlink unavailable)."""


@dataclass(frozen=True)
class Nic:
    pci_address: str  # "0000:00:0a.0"
    virtio_name: Optional[str]  # "virtio3"
    driver: Optional[str]  # virtio-level driver, "virtio_net"
    vendor: Optional[str]  # "0x1af4"
    device: Optional[str]  # "0x1000" legacy / "0x1041" modern
    numa_node: Optional[int]  # None or -1 when unknown
    ifname: Optional[str]  # netdev name when visible in this namespace
    ifindex: Optional[int]
    mac: Optional[str]
    mtu: Optional[int]
    operstate: Optional[str]
    carrier: Optional[bool]
    admin_up: Optional[bool]
    visible: bool  # netdev present in the namespace discovery ran in
    default_route: bool  # carries an IPv4 or IPv6 default route (netlink, all tables)
    eligible: bool  # may be handed to pods
    excluded_reason: Optional[str]  # why not eligible (None when eligible)
    problems: Tuple[str, ...]  # what could not be read
    pool: Optional[str] = None  # resource name of the pool it is in, set by pools.assign


def _match_link(
    fn: sysfs.VirtioNic,
    by_parent: Dict[str, netlink.Link],
    by_name: Dict[str, netlink.Link],
    problems: List[str],
) -> Optional[netlink.Link]:
    # The kernel names a link's parent device (virtioN) since 5.16: exact even when the sysfs
    # mount shows another namespace's netdevs.
    if fn.virtio_name and fn.virtio_name in by_parent:
        return by_parent[fn.virtio_name]
    # Otherwise by the netdev name sysfs lists, unless the kernel says that link has another
    # parent (a same-named link of some other device).
    for name in fn.netdevs:
        link = by_name.get(name)
        if link is None:
            problems.append(
                f"sysfs lists netdev {name}, but this network namespace has no such link"
            )
        elif link.parent_dev is None or (
            link.parent_bus == "virtio" and link.parent_dev == fn.virtio_name
        ):
            return link
        else:
            problems.append(
                f"link {name} here belongs to {link.parent_bus}/{link.parent_dev}, not this NIC"
            )
    return None


def exclusion(
    fn: sysfs.VirtioNic, families: Tuple[str, ...], in_use: Tuple[str, ...] = ()
) -> Optional[str]:
    """Why the NIC may not be handed to pods (None: it may). `families`: the default routes its
    link carries; `in_use`: its addresses the node's routes use (netlink.Snapshot)."""
    reasons = []
    if fn.vendor is None or fn.device is None:
        reasons.append("PCI vendor/device IDs unreadable")
    elif fn.vendor != sysfs.VIRTIO_VENDOR or fn.device not in sysfs.VIRTIO_NET_PCI_DEVICES:
        reasons.append(f"not a virtio-net PCI function ({fn.vendor}:{fn.device})")
    if fn.virtio_name is None:
        reasons.append("no virtio device under the PCI function")
    elif fn.driver is None:
        reasons.append("no driver bound to the virtio device")
    if families:
        reasons.append(f"carries the {' and '.join(families)} default route")
    if in_use:
        reasons.append(f"the node routes through its address {', '.join(in_use)}")
    return "; ".join(reasons) or None


def describe(fn: sysfs.VirtioNic, snap: netlink.Snapshot) -> Nic:
    """One PCI function as an inventory entry, its link found in `snap`."""
    return _nic(fn, snap, snap.by_parent("virtio"), snap.by_name())


def _nic(
    fn: sysfs.VirtioNic,
    snap: netlink.Snapshot,
    by_parent: Dict[str, netlink.Link],
    by_name: Dict[str, netlink.Link],
) -> Nic:
    problems = list(fn.problems)
    link = _match_link(fn, by_parent, by_name, problems)
    families = snap.default_routes.get(link.index, ()) if link else ()
    # Addresses the node routes with do not exclude a NIC here (an operator may pool an
    # addressed NIC); ehost-device's guard refuses to move one (`exclusion(..., in_use)`).
    reason = exclusion(fn, families)
    return Nic(
        pci_address=fn.pci_address,
        virtio_name=fn.virtio_name,
        driver=fn.driver,
        vendor=fn.vendor,
        device=fn.device,
        numa_node=fn.numa_node,
        ifname=link.name if link else None,
        ifindex=link.index if link else None,
        mac=link.mac if link else None,
        mtu=link.mtu if link else None,
        operstate=link.operstate if link else None,
        carrier=link.carrier if link else None,
        admin_up=link.admin_up if link else None,
        visible=link is not None,
        default_route=bool(families),
        eligible=reason is None,
        excluded_reason=reason,
        problems=tuple(problems),
    )


def discover(
    sysfs_root: str = "/sys",
    *,
    netns: Optional[str] = None,
    only: Optional[Iterable[str]] = None,
) -> List[Nic]:
    """Every virtio network PCI function in `sysfs_root`, sorted by PCI address, with link state
    read over netlink in the current namespace, or inside the network namespace file `netns`
    (missing = DiscoveryError, never created).

    With `only`, just those PCI addresses (the ones that are virtio NICs; absent ones are left
    out) and just their netdevs' links: the cost of one device, whatever the node's size.
    """
    if not os.path.isdir(os.path.join(sysfs_root, "bus", "pci", "devices")):
        raise DiscoveryError(f"{sysfs_root} is not a sysfs tree: it has no bus/pci/devices")
    names: Optional[List[str]] = None
    if only is None:
        functions = sysfs.scan(sysfs_root)
    else:
        found = (sysfs.read_virtio_nic(sysfs_root, a) for a in sorted(set(only)))
        functions = [fn for fn in found if fn is not None]
        names = [name for fn in functions for name in fn.netdevs]
    try:
        snap = netlink.snapshot(netns=netns, names=names)
    except netlink.NetlinkReadError as e:
        raise DiscoveryError(str(e)) from None
    by_parent = snap.by_parent("virtio")
    by_name = snap.by_name()
    return [_nic(fn, snap, by_parent, by_name) for fn in functions]
