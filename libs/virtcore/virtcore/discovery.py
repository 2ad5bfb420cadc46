"""The node's virtio NIC inventory: PCI facts from sysfs joined with link state, routes and
addresses from netlink, and whether each NIC may be handed to pods (and if not, why).

`exclusion` is the one rule that says whether a NIC may go to a pod. virtdp-discover and
virtdp-serve (through `discover`) and ehost-device's ADD (through `describe`) all decide with
it, so the device plugin never advertises a NIC the CNI plugin would refuse.

The inventory comes from the PCI and virtio buses, so a NIC whose netdev was moved into a pod's
namespace is still listed, as not visible here. This module is on ehost-device's ADD path:
stdlib only, Python 3.9+ (`pools` is imported only when a pool policy is given).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from virtcore import netlink, sysfs

if TYPE_CHECKING:
    from virtcore.pools import Config


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


@dataclass(frozen=True)
class PoolPolicy:
    """Only NICs in these pools may go to pods (ehost-device's node policy, `allowedPools`)."""

    config: Config  # the pool config the names refer to
    allowed: Tuple[str, ...]
    source: str  # where the restriction comes from (the policy file), for the reason


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
    fn: sysfs.VirtioNic, link: Optional[netlink.Link], snap: netlink.Snapshot
) -> Optional[str]:
    """Why the NIC may not be handed to pods (None: it may). The one rule: a virtio-net PCI
    function whose virtio device virtio_net drives, and which the node does not use itself: no
    default route (any table, IPv4 or IPv6, single- or multi-path) and no address the node's
    routes use goes out through its netdev `link` (None: not in this namespace, e.g. in a pod)."""
    reasons = []
    if fn.vendor is None or fn.device is None:
        reasons.append("PCI vendor/device IDs unreadable")
    elif fn.vendor != sysfs.VIRTIO_VENDOR or fn.device not in sysfs.VIRTIO_NET_PCI_DEVICES:
        reasons.append(f"not a virtio-net PCI function ({fn.vendor}:{fn.device})")
    if fn.virtio_name is None:
        reasons.append("no virtio device under the PCI function")
    elif fn.driver is None:
        reasons.append("no driver bound to the virtio device")
    elif fn.driver != "virtio_net":
        reasons.append(f"its virtio device is bound to {fn.driver}, not virtio_net")
    if link is not None:
        families = snap.default_routes.get(link.index, ())
        if families:
            reasons.append(f"carries the {' and '.join(families)} default route")
        in_use = snap.addresses_in_use.get(link.index, ())
        if in_use:
            reasons.append(f"the node routes through its address {', '.join(in_use)}")
    return "; ".join(reasons) or None


def describe(
    fn: sysfs.VirtioNic, snap: netlink.Snapshot, *, policy: Optional[PoolPolicy] = None
) -> Nic:
    """One PCI function as an inventory entry, its link found in `snap`; with `policy`, a NIC
    outside its allowed pools is not eligible either (and `pool` says which pool it is in)."""
    nic = _nic(fn, snap, snap.by_parent("virtio"), snap.by_name())
    if policy is None or not nic.eligible:
        return nic
    from virtcore import pools

    (nic,) = pools.assign(policy.config, [nic])
    if nic.pool in policy.allowed:
        return nic
    where = f"pool {nic.pool}" if nic.pool else "no pool"
    reason = (
        f"it is in {where} of {policy.config.source}, and {policy.source} allows only "
        f"{', '.join(policy.allowed)}"
    )
    return replace(nic, eligible=False, excluded_reason=reason)


def _nic(
    fn: sysfs.VirtioNic,
    snap: netlink.Snapshot,
    by_parent: Dict[str, netlink.Link],
    by_name: Dict[str, netlink.Link],
) -> Nic:
    problems = list(fn.problems)
    link = _match_link(fn, by_parent, by_name, problems)
    reason = exclusion(fn, link, snap)
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
        default_route=bool(link and snap.default_routes.get(link.index)),
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
