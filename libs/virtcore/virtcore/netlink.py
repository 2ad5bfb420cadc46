"""Link state and default routes, read from the kernel over rtnetlink, and link and route change
events.

One `snapshot()` opens one netlink socket, in the current network namespace (a stdlib socket
and decoder here) or inside a named one (pyroute2, which opens its socket there; the calling
thread never switches namespace), and reads every link (or only the named ones), every IPv4/IPv6
route of every routing table and every address: what `discovery.exclusion` needs to say whether
a NIC is the node's own (a default route, an address the node routes with).
`event_socket()` subscribes to link and route changes of the current namespace (stdlib only,
non-blocking, for a selector) and `parse_events()` decodes what it receives.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

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
    # ifindex -> the link's addresses (CIDR) that the node's routes use.
    addresses_in_use: Mapping[int, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def default_route_ifindexes(self) -> FrozenSet[int]:
        return frozenset(self.default_routes)

    @classmethod
    def of(cls, links: Tuple[Link, ...], routes: List[Any], addrs: List[Any]) -> Snapshot:
        return cls(
            links=links,
            default_routes=default_routes(routes),
            addresses_in_use=addresses_in_use(addrs, routes),
        )

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
    route), or one of its addresses is some route's preferred source (an IPv4 address is always
    the source of its own `local` route). A NIC the node talks through this way is the node's
    own, whatever its default routes say. `addrs`: {index, prefixlen, scope, address};
    `routes`: {table, prefsrc, oif, multipath} as `_decode_route` and `_plain_route` make them."""
    own: Dict[int, Dict[str, str]] = {}  # ifindex -> address -> CIDR
    for a in addrs:
        address = a.get("address")
        if not address or a["scope"] >= RT_SCOPE_LINK:
            continue
        own.setdefault(int(a["index"]), {})[address] = f"{address}/{a['prefixlen']}"
    routed: Set[int] = set()
    sources: Set[str] = set()
    for r in routes:
        if r.get("prefsrc"):
            sources.add(r["prefsrc"])
        if r.get("table") == RT_TABLE_LOCAL:
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


def _plain_route(msg: Any) -> Dict[str, Any]:
    """A pyroute2 route message as the plain dict `_decode_route` makes."""
    hops = [{"oif": hop.get("oif")} for hop in msg.get("multipath") or ()]
    return {
        "family": msg["family"],
        "dst_len": msg["dst_len"],
        "type": msg["type"],
        "table": msg.get("table") or msg["table"],
        "oif": msg.get("oif"),
        "prefsrc": msg.get("prefsrc"),
        "multipath": hops,
    }


def _plain_address(msg: Any) -> Dict[str, Any]:
    return {
        "index": msg["index"],
        "prefixlen": msg["prefixlen"],
        "scope": msg["scope"],
        "address": msg.get("local") or msg.get("address"),
    }


def snapshot(*, netns: Optional[str] = None, names: Optional[Sequence[str]] = None) -> Snapshot:
    """Every link (or only the links called `names`; missing ones are left out), the
    default-route links and the addresses in use, read in the current namespace or in the
    network namespace file `netns` (e.g. /var/run/netns/x). A missing `netns` is an error: it is
    never created. Raises NetlinkReadError.

    In the current namespace the dumps are read and decoded here (stdlib): pyroute2 takes
    about a millisecond per link, which made a resync of a large node cost a second of CPU.
    """
    if netns is None:
        try:
            return _snapshot_here(names)
        except OSError as e:
            code = e.errno or errno.EIO
            raise NetlinkReadError(f"netlink dump failed: {os.strerror(code)}") from None
    try:
        # A network namespace file lives on nsfs, as /proc/self/ns/net does. Checked first:
        # pyroute2 fails on anything else only after starting an event loop it then leaks.
        nsfs = os.stat(netns).st_dev == os.stat("/proc/self/ns/net").st_dev
    except FileNotFoundError:
        raise NetlinkReadError(f"network namespace {netns} does not exist") from None
    except OSError as e:
        raise NetlinkReadError(f"cannot read network namespace {netns}: {e.strerror}") from None
    if not nsfs:
        raise NetlinkReadError(f"{netns} is not a network namespace (not an nsfs file)")
    from pyroute2.iproute.linux import IPRoute  # ~140 ms: only when netlink is really read

    try:
        # flags=0: pyroute2 would otherwise create a missing namespace.
        ipr = IPRoute(netns=netns, flags=0)
    except OSError as e:
        raise NetlinkReadError(
            f"cannot open a netlink socket in network namespace {netns}: {e.strerror or e}"
        ) from None
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with ipr:
            if names is None:
                links = tuple(_link(m) for m in ipr.get_links())
            else:
                links = tuple(_link(m) for name in names for m in _get_link(ipr, name))
            # AF_UNSPEC dumps only IPv4 routes; ask per family. A dump covers every table.
            routes = [_plain_route(m) for m in ipr.route("dump", family=socket.AF_INET)]
            try:
                routes += [_plain_route(m) for m in ipr.route("dump", family=socket.AF_INET6)]
            except NetlinkError as e:
                if e.code != errno.EAFNOSUPPORT:  # IPv6 disabled: no IPv6 default route
                    raise
            addrs = [_plain_address(m) for m in ipr.get_addr()]
    except (OSError, NetlinkError) as e:
        code = getattr(e, "code", None) or getattr(e, "errno", None) or errno.EIO
        raise NetlinkReadError(f"netlink dump failed: {os.strerror(code)}") from None
    return Snapshot.of(links, routes, addrs)


def _get_link(ipr: Any, name: str) -> List[Any]:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return list(ipr.link("get", ifname=name))
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return []  # gone since sysfs listed it
        raise


# -- reading rtnetlink here, without pyroute2 ----------------------------------------------------

RTM_GETLINK, RTM_GETROUTE, RTM_GETADDR, RTM_NEWADDR = 18, 26, 22, 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
IFLA_ADDRESS, IFLA_MTU, IFLA_OPERSTATE, IFLA_IFALIAS = 1, 4, 16, 20
IFLA_PARENT_DEV_NAME, IFLA_PARENT_DEV_BUS_NAME = 56, 57
RTA_OIF, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = 4, 7, 9, 15
IFA_ADDRESS, IFA_LOCAL = 1, 2
_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex


def _text(raw: Optional[bytes]) -> Optional[str]:
    return raw.rstrip(b"\0").decode("utf-8", "replace") if raw is not None else None


def _request(sock: socket.socket, kind: int, flags: int, body: bytes, seq: int) -> List[Any]:
    """Send one request; every (type, flags, payload) of its answer, until DONE or the answer."""
    sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body)
    out: List[Any] = []
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, mtype, mflags, mseq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                raise OSError(errno.EIO, "malformed netlink message")
            payload = data[offset + _NLMSG.size : offset + length]
            offset += (length + 3) & ~3
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                if mflags & NLM_F_DUMP_INTR:
                    raise InterruptedError(errno.EINTR, "dump interrupted")
                return out
            if mtype == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return out
            out.append((mtype, mflags, payload))
            if not flags & NLM_F_DUMP:
                return out


def _mac(raw: Optional[bytes]) -> Optional[str]:
    return ":".join(f"{b:02x}" for b in raw) if raw else None


def _decode_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(payload, 0)
    attrs = _attrs(payload, _IFINFO.size, len(payload))
    mtu = attrs.get(IFLA_MTU)
    oper = attrs.get(IFLA_OPERSTATE)
    carrier = attrs.get(IFLA_CARRIER)
    return Link(
        index=index,
        name=_text(attrs.get(IFLA_IFNAME)) or "",
        mac=_mac(attrs.get(IFLA_ADDRESS)),
        mtu=struct.unpack("=I", mtu[:4])[0] if mtu else None,
        operstate=_OPERSTATES[oper[0]] if oper and oper[0] < len(_OPERSTATES) else None,
        carrier=bool(carrier[0]) if carrier else None,
        admin_up=bool(flags & IFF_UP),
        alias=_text(attrs.get(IFLA_IFALIAS)) or None,
        parent_bus=_text(attrs.get(IFLA_PARENT_DEV_BUS_NAME)),
        parent_dev=_text(attrs.get(IFLA_PARENT_DEV_NAME)),
    )


def _ip(family: int, raw: Optional[bytes]) -> Optional[str]:
    size = 4 if family == socket.AF_INET else 16
    if raw is None or len(raw) < size:
        return None
    return socket.inet_ntop(family, raw[:size])


def _decode_route(payload: bytes) -> Dict[str, Any]:
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(
        payload, 0
    )
    attrs = _attrs(payload, _RTMSG.size, len(payload))
    if RTA_TABLE in attrs:  # tables above 255 are only in the attribute
        table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0]
    route: Dict[str, Any] = {"family": family, "dst_len": dst_len, "type": rtype, "table": table}
    route["prefsrc"] = _ip(family, attrs.get(RTA_PREFSRC))
    if RTA_OIF in attrs:
        route["oif"] = struct.unpack("=i", attrs[RTA_OIF][:4])[0]
    hops = []
    raw = attrs.get(RTA_MULTIPATH, b"")
    offset = 0
    while offset + _RTNEXTHOP.size <= len(raw):
        length, _hflags, _hops, ifindex = _RTNEXTHOP.unpack_from(raw, offset)
        if length < _RTNEXTHOP.size:
            break
        hops.append({"oif": ifindex})
        offset += (length + 3) & ~3
    if hops:
        route["multipath"] = hops
    return route


def _decode_address(payload: bytes) -> Dict[str, Any]:
    family, prefixlen, _flags, scope, index = _IFADDR.unpack_from(payload, 0)
    attrs = _attrs(payload, _IFADDR.size, len(payload))
    # IFA_LOCAL is the link's own address; IFA_ADDRESS the peer's on a point-to-point link.
    raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
    return {"index": index, "prefixlen": prefixlen, "scope": scope, "address": _ip(family, raw)}


def _snapshot_here(names: Optional[Sequence[str]]) -> Snapshot:
    for _attempt in range(5):
        try:
            return _read_here(names)
        except InterruptedError:
            continue  # the links changed during the dump: read again
    return _read_here(names)


def _read_here(names: Optional[Sequence[str]]) -> Snapshot:
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        seq = 1
        link_msgs: List[Any] = []
        if names is None:
            ifinfo = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            link_msgs = _request(sock, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, ifinfo, seq)
        else:
            for name in names:
                seq += 1
                raw = name.encode() + b"\0"
                attr = _RTA.pack(_RTA.size + len(raw), IFLA_IFNAME) + raw
                attr += b"\0" * (-len(attr) % 4)
                body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr
                try:
                    link_msgs += _request(sock, RTM_GETLINK, NLM_F_REQUEST, body, seq)
                except OSError as e:
                    if e.errno not in (errno.ENODEV, errno.ENOENT):
                        raise  # else gone since sysfs listed it
        links = tuple(_decode_link(p) for t, _f, p in link_msgs if t == RTM_NEWLINK)
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            seq += 1
            rtmsg = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
            try:
                msgs = _request(sock, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, rtmsg, seq)
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == errno.EAFNOSUPPORT:
                    continue  # IPv6 disabled: no IPv6 default route
                raise
            routes += [_decode_route(p) for t, _f, p in msgs if t == RTM_NEWROUTE]
        seq += 1
        ifaddr = _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)  # every family
        msgs = _request(sock, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, ifaddr, seq)
        addrs = [_decode_address(p) for t, _f, p in msgs if t == RTM_NEWADDR]
    return Snapshot.of(links, routes, addrs)


# -- events ---------------------------------------------------------------------------------------

RTMGRP_LINK = 0x1
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_NEWROUTE, RTM_DELROUTE = 16, 17, 24, 25
IFLA_IFNAME, IFLA_CARRIER = 3, 33
SO_RCVBUFFORCE = 33
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class LinkEvent:
    """RTM_NEWLINK (a link appeared or changed) or RTM_DELLINK (deleted or moved away)."""

    deleted: bool
    index: int
    name: Optional[str]
    admin_up: bool
    carrier: Optional[bool]


@dataclass(frozen=True)
class RouteEvent:
    """RTM_NEWROUTE/RTM_DELROUTE; `default` for a unicast default route (dst_len 0); `oifs`:
    the links it goes out through (a NIC's eligibility may have changed)."""

    deleted: bool
    default: bool
    oifs: Tuple[int, ...] = ()


def event_socket(*, receive_buffer: Optional[int] = None) -> socket.socket:
    """A non-blocking rtnetlink socket of this namespace bound to link and route changes.
    Reading it after the kernel dropped messages (a full buffer) raises ENOBUFS once."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )
    try:
        if receive_buffer:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
    except BaseException:
        sock.close()
        raise
    return sock


def _attrs(data: bytes, offset: int, end: int) -> Dict[int, bytes]:
    out = {}
    while offset + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size:
            break
        out[kind & 0x3FFF] = data[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3
    return out


def parse_events(data: bytes) -> List[Any]:
    """The LinkEvents and RouteEvents in one datagram; other messages are skipped."""
    events: List[Any] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        body, end = offset + _NLMSG.size, min(offset + length, len(data))
        if kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFO.size <= end:
            _family, _type, index, flags, _change = _IFINFO.unpack_from(data, body)
            attrs = _attrs(data, body + _IFINFO.size, end)
            name = attrs.get(IFLA_IFNAME)
            carrier = attrs.get(IFLA_CARRIER)
            events.append(
                LinkEvent(
                    deleted=kind == RTM_DELLINK,
                    index=index,
                    name=name.rstrip(b"\0").decode("utf-8", "replace") if name else None,
                    admin_up=bool(flags & IFF_UP),
                    carrier=None if not carrier else bool(carrier[0]),
                )
            )
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and body + _RTMSG.size <= end:
            route = _decode_route(data[body:end])
            oifs = [route.get("oif")] + [hop["oif"] for hop in route.get("multipath", ())]
            events.append(
                RouteEvent(
                    deleted=kind == RTM_DELROUTE,
                    default=route["family"] in _FAMILIES
                    and route["dst_len"] == 0
                    and route["type"] == RTN_UNICAST,
                    oifs=tuple(sorted({i for i in oifs if i})),
                )
            )
        offset += (length + 3) & ~3
    return events
