"""Link state and default routes, read from the kernel over rtnetlink (pyroute2).

One `snapshot()` opens one netlink socket, in the current network namespace or inside a named
one (the socket is opened there; the calling thread never switches namespace), and reads every
link, every IPv4/IPv6 default route of every routing table, and which links' addresses the
node's routes use. `read` does the same through a socket the caller already has.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, Mapping, Optional, Set, Tuple

IFF_UP = 0x1
RTN_UNICAST = 1


class NetlinkReadError(RuntimeError):
    """The namespace could not be opened or the kernel refused a dump."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: Optional[str]
    mtu: Optional[int]
    operstate: Optional[str]  # lower case, as sysfs shows it: "up", "down", "unknown", ...
    carrier: Optional[bool]
    admin_up: bool
    alias: Optional[str]
    parent_bus: Optional[str]  # "virtio" for a virtio_net NIC (kernel 5.16+), else None
    parent_dev: Optional[str]  # "virtio3"


@dataclass(frozen=True)
class Snapshot:
    links: Tuple[Link, ...]
    # ifindex -> ("IPv4",), ("IPv6",) or ("IPv4", "IPv6"): the default routes a link carries.
    default_routes: Mapping[int, Tuple[str, ...]]
    # ifindex -> the link's addresses (CIDR) that the node's routes use: see `addresses_in_use`.
    addresses_in_use: Mapping[int, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def default_route_ifindexes(self) -> FrozenSet[int]:
        return frozenset(self.default_routes)

    def by_name(self) -> Dict[str, Link]:
        return {link.name: link for link in self.links}

    def by_parent(self, bus: str) -> Dict[str, Link]:
        return {
            link.parent_dev: link
            for link in self.links
            if link.parent_bus == bus and link.parent_dev is not None
        }


def _link(msg: Any) -> Link:
    carrier = msg.get("carrier")
    operstate = msg.get("operstate")
    return Link(
        index=int(msg["index"]),
        name=msg.get("ifname"),
        mac=msg.get("address"),
        mtu=msg.get("mtu"),
        operstate=operstate.lower() if isinstance(operstate, str) else None,
        carrier=None if carrier is None else bool(carrier),
        admin_up=bool(msg["flags"] & IFF_UP),
        alias=msg.get("ifalias"),
        parent_bus=msg.get("parent_dev_bus_name"),
        parent_dev=msg.get("parent_dev_name"),
    )


_FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def default_routes(routes: Iterable[Any]) -> Dict[int, Tuple[str, ...]]:
    """ifindex -> families of the unicast default routes (dst_len 0) it is an output of, single-
    or multi-path, whatever the table."""
    out: Dict[int, Set[str]] = {}
    for r in routes:
        family = _FAMILIES.get(r["family"])
        if family is None or r["dst_len"] != 0 or r["type"] != RTN_UNICAST:
            continue
        oifs = [r.get("oif")] + [hop.get("oif") for hop in r.get("multipath") or ()]
        for oif in oifs:
            if oif:
                out.setdefault(int(oif), set()).add(family)
    return {i: tuple(sorted(f)) for i, f in out.items()}


RT_TABLE_LOCAL = 255
RT_SCOPE_LINK = 253


def addresses_in_use(addrs: Iterable[Any], routes: Iterable[Any]) -> Dict[int, Tuple[str, ...]]:
    """ifindex -> the link's own addresses (not link-local) that the node routes with: the link
    is the output of a route outside the `local` table (an address's prefix route, a static
    route), or one of its addresses is some route's preferred source. A NIC the node talks
    through this way is the node's own, whatever its default routes say."""
    own: Dict[int, Dict[str, str]] = {}  # ifindex -> address -> CIDR
    for a in addrs:
        address = a.get("address")
        if not address or a["scope"] >= RT_SCOPE_LINK:
            continue
        own.setdefault(int(a["index"]), {})[address] = f"{address}/{a['prefixlen']}"
    routed: Set[int] = set()
    sources: Set[str] = set()
    for r in routes:
        table = r.get("table") or r["table"]
        if r.get("prefsrc"):
            sources.add(r.get("prefsrc"))
        if table == RT_TABLE_LOCAL:
            continue
        for oif in [r.get("oif")] + [hop.get("oif") for hop in r.get("multipath") or ()]:
            if oif:
                routed.add(int(oif))
    out: Dict[int, Tuple[str, ...]] = {}
    for index, by_address in own.items():
        used = sorted(by_address.values()) if index in routed else []
        used += sorted(c for a, c in by_address.items() if a in sources and c not in used)
        if used:
            out[index] = tuple(used)
    return out


def _netlink_error() -> Any:
    # Already loaded (ehost-device loads pyroute2 without its package __init__): reuse it, as a
    # fresh `from pyroute2... import` could run that __init__ (~140 ms).
    loaded = sys.modules.get("pyroute2.netlink.exceptions")
    if loaded is not None:
        return loaded.NetlinkError
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


def read(ipr: Any) -> Snapshot:
    """Every link, route and address through an open IPRoute socket, boiled down to a
    Snapshot. Raises NetlinkReadError."""
    NetlinkError = _netlink_error()
    try:
        links = tuple(_link(m) for m in ipr.get_links())
        # AF_UNSPEC dumps only IPv4 routes; ask per family. A dump covers every table.
        routes = list(ipr.route("dump", family=socket.AF_INET))
        try:
            routes += list(ipr.route("dump", family=socket.AF_INET6))
        except NetlinkError as e:
            if e.code != errno.EAFNOSUPPORT:  # IPv6 disabled: no IPv6 default route
                raise
        addrs = list(ipr.get_addr())
    except (OSError, NetlinkError) as e:
        code = getattr(e, "code", None) or getattr(e, "errno", None) or errno.EIO
        raise NetlinkReadError(f"netlink dump failed: {os.strerror(code)}") from None
    return Snapshot(
        links=links,
        default_routes=default_routes(routes),
        addresses_in_use=addresses_in_use(addrs, routes),
    )


def snapshot(*, netns: Optional[str] = None) -> Snapshot:
    """Every link and the default-route links, read in the current namespace or in the network
    namespace file `netns` (e.g. /var/run/netns/x). A missing `netns` is an error: it is never
    created."""
    from pyroute2.iproute.linux import IPRoute  # ~140 ms: only when netlink is really read

    if netns is not None and not os.path.exists(netns):
        raise NetlinkReadError(f"network namespace {netns} does not exist")
    try:
        # flags=0: pyroute2 would otherwise create a missing namespace.
        ipr = IPRoute(netns=netns, flags=0) if netns is not None else IPRoute()
    except OSError as e:
        where = f"in network namespace {netns}" if netns else "in this network namespace"
        raise NetlinkReadError(f"cannot open a netlink socket {where}: {e.strerror or e}") from None
    with ipr:
        return read(ipr)
