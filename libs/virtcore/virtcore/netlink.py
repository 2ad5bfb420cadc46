"""rtnetlink, stdlib only: links, addresses and routes read and changed in any network namespace,
and link and route change events.

`socket_in(path)` makes a rtnetlink socket inside the network namespace `path` (None: the
current one): a short-lived thread enters the namespace, creates the socket and exits, and the
socket stays bound to the namespace it was made in. Nothing is forked, and no thread that does
other work ever changes namespace. A `Socket` sends requests (dumps, gets, changes) and decodes
the answers; `virtcore.netns` builds NIC moves and settings, with their undo, on it.

`snapshot()` reads, in the current namespace or in a named one, every link (or only the named
ones), every IPv4/IPv6 route of every routing table and every address: what
`discovery.exclusion` needs to say whether a NIC is the node's own (a default route, an address
the node routes with). `event_socket()` subscribes to link and route changes of the current
namespace (non-blocking, for a selector) and `parse_events()` decodes what it receives.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

IFF_UP = 0x1
RTN_UNICAST = 1
CLONE_NEWNET = 0x40000000

# Message types, flags and attributes (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
# linux/if_addr.h).
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x4, 0x10, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE, IFLA_LINKINFO = 1, 3, 4, 16, 18
IFLA_IFALIAS, IFLA_NET_NS_FD, IFLA_CARRIER = 20, 28, 33
IFLA_PARENT_DEV_NAME, IFLA_PARENT_DEV_BUS_NAME = 56, 57
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 4, 5, 6, 7
RTA_METRICS, RTA_MULTIPATH, RTA_TABLE = 8, 9, 15
RTAX_MTU, RTAX_ADVMSS = 2, 8
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RT_SCOPE_LINK = 253
RTPROT_STATIC = 4  # "proto static", as pyroute2 marked the routes it added
_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_RTA = struct.Struct("=HH")
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_RECV = 65536  # the kernel fills dump datagrams up to 32 KiB


class NetlinkReadError(RuntimeError):
    """The namespace could not be opened or the kernel refused a dump."""


class NetlinkError(OSError):
    """The kernel refused a request; `errno` says why."""


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
    kind: Optional[str] = None  # IFLA_INFO_KIND ("veth", ...); None for a physical NIC


@dataclass(frozen=True)
class Snapshot:
    links: Tuple[Link, ...]
    # ifindex -> ("IPv4",), ("IPv6",) or ("IPv4", "IPv6"): the default routes a link carries.
    default_routes: Mapping[int, Tuple[str, ...]]
    # ifindex -> the link's addresses (CIDR) that the node's routes use.
    addresses_in_use: Mapping[int, Tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, links: Tuple[Link, ...], routes: List[Any], addrs: List[Any]) -> Snapshot:
        return cls(
            links=links,
            default_routes=default_routes(routes),
            addresses_in_use=addresses_in_use(addrs, routes),
        )

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


# -- the socket -----------------------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    raw = _RTA.pack(_RTA.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _ip(address: str) -> Tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return family, socket.inet_pton(family, address)


class Socket:
    """One rtnetlink socket, bound to the namespace it was made in; one thread uses it.

    Requests go one at a time: each is answered (an ack, one message, or a whole dump) before
    the next is sent. A refusal raises NetlinkError with the kernel's errno.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0
        sock.bind((0, 0))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def request(self, kind: int, flags: int, body: bytes) -> List[Tuple[int, bytes]]:
        """Send one request; (type, payload) of every message of its answer. A dump that the
        kernel reports interrupted (the table changed meanwhile) raises InterruptedError."""
        self._seq += 1
        seq = self._seq
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body)
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        out: List[Tuple[int, bytes]] = []
        interrupted = False
        while True:
            data, _anc, mflags, _addr = self._sock.recvmsg(_RECV)
            if mflags & socket.MSG_TRUNC:
                raise NetlinkError(errno.EMSGSIZE, f"netlink answer larger than {_RECV} bytes")
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, mtype, nflags, mseq, _pid = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise NetlinkError(errno.EIO, "malformed netlink message")
                payload = data[offset + _NLMSG.size : offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue  # the rest of an earlier request's answer
                interrupted = interrupted or bool(nflags & NLM_F_DUMP_INTR)
                if mtype == NLMSG_DONE:
                    if interrupted:
                        raise InterruptedError(errno.EINTR, "dump interrupted")
                    return out
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return out
                out.append((mtype, payload))
                if not dump and not flags & NLM_F_ACK:
                    return out

    def dump(self, kind: int, body: bytes) -> List[Tuple[int, bytes]]:
        """A dump, read again while the kernel reports it interrupted (at most 5 times)."""
        for _attempt in range(4):
            try:
                return self.request(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
            except InterruptedError:
                continue
        return self.request(kind, NLM_F_REQUEST | NLM_F_DUMP, body)

    def change(self, kind: int, body: bytes, flags: int = 0) -> None:
        self.request(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body)

    # -- links ------------------------------------------------------------------------------------

    def links(self) -> List[Link]:
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        return [decode_link(p) for t, p in self.dump(RTM_GETLINK, body) if t == RTM_NEWLINK]

    def link(self, *, name: Optional[str] = None, index: int = 0) -> Optional[Link]:
        """The link called `name` (or numbered `index`), None when there is none."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        if name is not None:
            body += _attr(IFLA_IFNAME, _cstr(name))
        try:
            msgs = self.request(RTM_GETLINK, NLM_F_REQUEST, body)
        except NetlinkError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return next((decode_link(p) for t, p in msgs if t == RTM_NEWLINK), None)

    def set_link(
        self,
        index: int,
        *,
        up: Optional[bool] = None,
        name: Optional[str] = None,
        mtu: Optional[int] = None,
        mac: Optional[str] = None,
        alias: Optional[str] = None,
        netns_fd: Optional[int] = None,
    ) -> None:
        """Change link `index`: admin state, name, MTU, MAC, alias ("" clears it), or, with
        `netns_fd`, move it into that namespace (renamed on arrival when `name` is given)."""
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if netns_fd is not None:
            body += _attr(IFLA_NET_NS_FD, _U32.pack(netns_fd))
        if name is not None:
            body += _attr(IFLA_IFNAME, _cstr(name))
        if mtu is not None:
            body += _attr(IFLA_MTU, _U32.pack(mtu))
        if mac is not None:
            body += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        if alias is not None:
            # Without a terminating NUL, as iproute2 sends it: the kernel stores the bytes
            # given, and no bytes at all clear the alias.
            body += _attr(IFLA_IFALIAS, alias.encode())
        self.change(RTM_NEWLINK, body)

    # -- addresses --------------------------------------------------------------------------------

    def addresses(self, family: int = socket.AF_UNSPEC) -> List[Dict[str, Any]]:
        body = _IFADDR.pack(family, 0, 0, 0, 0)
        return [decode_address(p) for t, p in self.dump(RTM_GETADDR, body) if t == RTM_NEWADDR]

    def address(self, add: bool, index: int, address: str, prefixlen: int, flags: int = 0) -> None:
        """Add (or delete) `address`/`prefixlen` on link `index`."""
        family, raw = _ip(address)
        body = _IFADDR.pack(family, prefixlen, flags, 0, index)
        if family == socket.AF_INET:
            body += _attr(IFA_LOCAL, raw)
        body += _attr(IFA_ADDRESS, raw)
        if add:
            self.change(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)
        else:
            self.change(RTM_DELADDR, body)

    # -- routes -----------------------------------------------------------------------------------

    def routes(self) -> List[Dict[str, Any]]:
        """Every IPv4 and IPv6 route, from every table (see `decode_route` for the keys). One
        dump: asked for AF_UNSPEC, the kernel dumps each family in turn; other families (the
        multicast routing tables) are left out, and with IPv6 off there is simply none."""
        body = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        routes = (decode_route(p) for t, p in self.dump(RTM_GETROUTE, body) if t == RTM_NEWROUTE)
        return [r for r in routes if r["family"] in _FAMILIES]

    def route(
        self,
        add: bool,
        dst: str,
        *,
        oif: int,
        gateway: Optional[str] = None,
        priority: Optional[int] = None,
        table: Optional[int] = None,
        scope: Optional[int] = None,
        mtu: Optional[int] = None,
        advmss: Optional[int] = None,
    ) -> None:
        """Add (or delete) the unicast route to `dst` (CIDR) through link `oif`."""
        address, _, plen = dst.partition("/")
        family, raw = _ip(address)
        dst_len = int(plen) if plen else len(raw) * 8
        table = RT_TABLE_MAIN if table is None else table
        body = _RTMSG.pack(
            family,
            dst_len,
            0,
            0,
            table if table < 256 else 0,
            RTPROT_STATIC,
            scope or 0,
            RTN_UNICAST,
            0,
        )
        if dst_len:
            body += _attr(RTA_DST, raw)
        body += _attr(RTA_OIF, _U32.pack(oif))
        if gateway:
            body += _attr(RTA_GATEWAY, _ip(gateway)[1])
        if priority is not None:
            body += _attr(RTA_PRIORITY, _U32.pack(priority))
        body += _attr(RTA_TABLE, _U32.pack(table))
        metrics = b""
        if mtu:
            metrics += _attr(RTAX_MTU, _U32.pack(mtu))
        if advmss:
            metrics += _attr(RTAX_ADVMSS, _U32.pack(advmss))
        if metrics:
            body += _attr(RTA_METRICS, metrics)
        if add:
            self.change(RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_EXCL)
        else:
            self.change(RTM_DELROUTE, body)


def _raw_socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    )


_LIBC: Any = None


def libc() -> Any:
    """The C library, for setns and unshare on Pythons that lack os.setns (before 3.12). The
    process's own symbol table (`dlopen(NULL)`) has both, on glibc and musl alike."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _libc_call(name: str, *args: int) -> None:
    import ctypes

    if getattr(libc(), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd`. Only a thread that does
    nothing else may call this (see `in_thread`)."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
    else:
        _libc_call("setns", fd, CLONE_NEWNET)


def unshare() -> None:
    """Move the calling thread into a new, empty network namespace (see `setns`)."""
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(CLONE_NEWNET)
    else:
        _libc_call("unshare", CLONE_NEWNET)


def in_thread(work: Any) -> Any:
    """`work()` run in a thread of its own that ends with it: what `work` does to its thread's
    namespaces dies with the thread. Returns what it returned; raises what it raised."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def socket_in(path: Optional[str] = None, *, fd: Optional[int] = None) -> Socket:
    """A rtnetlink socket in the network namespace at `path` or open as `fd` (neither: the
    current one). Raises FileNotFoundError for a missing `path` (nothing is ever created) and
    OSError when it is not a network namespace."""
    if path is None and fd is None:
        return Socket(_raw_socket())

    def make() -> socket.socket:
        nsfd = fd if fd is not None else os.open(str(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(nsfd)
        finally:
            if fd is None:
                os.close(nsfd)
        return _raw_socket()

    return Socket(in_thread(make))


# -- decoding -------------------------------------------------------------------------------------


def _attrs(data: bytes, offset: int, end: int) -> Dict[int, bytes]:
    out = {}
    while offset + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size:
            break
        out[kind & 0x3FFF] = data[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3
    return out


def _text(raw: Optional[bytes]) -> Optional[str]:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace") if raw is not None else None


def _mac(raw: Optional[bytes]) -> Optional[str]:
    return ":".join(f"{b:02x}" for b in raw) if raw else None


def _u32(raw: Optional[bytes]) -> Optional[int]:
    return _U32.unpack(raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def decode_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(payload, 0)
    attrs = _attrs(payload, _IFINFO.size, len(payload))
    oper = attrs.get(IFLA_OPERSTATE)
    carrier = attrs.get(IFLA_CARRIER)
    info = attrs.get(IFLA_LINKINFO)
    kind = _text(_attrs(info, 0, len(info)).get(IFLA_INFO_KIND)) if info else None
    return Link(
        index=index,
        name=_text(attrs.get(IFLA_IFNAME)) or "",
        mac=_mac(attrs.get(IFLA_ADDRESS)),
        mtu=_u32(attrs.get(IFLA_MTU)),
        operstate=_OPERSTATES[oper[0]] if oper and oper[0] < len(_OPERSTATES) else None,
        carrier=bool(carrier[0]) if carrier else None,
        admin_up=bool(flags & IFF_UP),
        alias=_text(attrs.get(IFLA_IFALIAS)) or None,
        parent_bus=_text(attrs.get(IFLA_PARENT_DEV_BUS_NAME)),
        parent_dev=_text(attrs.get(IFLA_PARENT_DEV_NAME)),
        kind=kind or None,
    )


def _address(family: int, raw: Optional[bytes]) -> Optional[str]:
    size = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    if raw is None or not size or len(raw) < size:
        return None
    return socket.inet_ntop(family, raw[:size])


def decode_address(payload: bytes) -> Dict[str, Any]:
    """family, prefixlen, flags, scope, index, and address: the link's own (IFA_LOCAL; else
    IFA_ADDRESS, which is the peer's on a point-to-point link and the only one for IPv6)."""
    family, prefixlen, flags, scope, index = _IFADDR.unpack_from(payload, 0)
    attrs = _attrs(payload, _IFADDR.size, len(payload))
    return {
        "family": family,
        "prefixlen": prefixlen,
        "flags": flags,
        "scope": scope,
        "index": index,
        "address": _address(family, attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))),
    }


def decode_route(payload: bytes) -> Dict[str, Any]:
    """family, dst_len, table (RTA_TABLE, else the header's), scope, type, and when present
    dst, gateway, oif, priority, prefsrc, mtu, advmss and multipath ([{oif}, ...])."""
    family, dst_len, _src_len, _tos, table, _proto, scope, rtype, _flags = _RTMSG.unpack_from(
        payload, 0
    )
    attrs = _attrs(payload, _RTMSG.size, len(payload))
    route: Dict[str, Any] = {
        "family": family,
        "dst_len": dst_len,
        "table": _u32(attrs.get(RTA_TABLE)) or table,
        "scope": scope,
        "type": rtype,
    }
    for key, kind in (("dst", RTA_DST), ("gateway", RTA_GATEWAY), ("prefsrc", RTA_PREFSRC)):
        if kind in attrs:
            route[key] = _address(family, attrs[kind])
    for key, kind in (("oif", RTA_OIF), ("priority", RTA_PRIORITY)):
        if kind in attrs:
            route[key] = _u32(attrs[kind])
    metrics = attrs.get(RTA_METRICS)
    if metrics:
        values = _attrs(metrics, 0, len(metrics))
        for key, kind in (("mtu", RTAX_MTU), ("advmss", RTAX_ADVMSS)):
            if kind in values:
                route[key] = _u32(values[kind])
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


# -- snapshots ------------------------------------------------------------------------------------

_FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def default_routes(routes: Iterable[Mapping[str, Any]]) -> Dict[int, Tuple[str, ...]]:
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


def addresses_in_use(
    addrs: Iterable[Mapping[str, Any]], routes: Iterable[Mapping[str, Any]]
) -> Dict[int, Tuple[str, ...]]:
    """ifindex -> the link's own addresses (not link-local) that the node routes with: the link
    is the output of a route outside the `local` table (an address's prefix route, a static
    route), or one of its addresses is some route's preferred source (an IPv4 address is always
    the source of its own `local` route). A NIC the node talks through this way is the node's
    own, whatever its default routes say. `addrs` and `routes` as `decode_address` and
    `decode_route` make them."""
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
        if r["table"] == RT_TABLE_LOCAL:
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


def _read_error(e: OSError) -> NetlinkReadError:
    return NetlinkReadError(f"netlink dump failed: {os.strerror(e.errno or errno.EIO)}")


def snapshot(*, netns: Optional[str] = None, names: Optional[Sequence[str]] = None) -> Snapshot:
    """Every link (or only the links called `names`; missing ones are left out), the
    default-route links and the addresses in use, read in the current namespace or in the
    network namespace file `netns` (e.g. /var/run/netns/x). A missing `netns` is an error: it is
    never created. Raises NetlinkReadError."""
    if netns is not None:
        try:
            # A network namespace file lives on nsfs, as /proc/self/ns/net does.
            nsfs = os.stat(netns).st_dev == os.stat("/proc/self/ns/net").st_dev
        except FileNotFoundError:
            raise NetlinkReadError(f"network namespace {netns} does not exist") from None
        except OSError as e:
            raise NetlinkReadError(f"cannot read network namespace {netns}: {e.strerror}") from None
        if not nsfs:
            raise NetlinkReadError(f"{netns} is not a network namespace (not an nsfs file)")
    try:
        sock = socket_in(netns)
    except FileNotFoundError:
        raise NetlinkReadError(f"network namespace {netns} does not exist") from None
    except OSError as e:
        where = f" in network namespace {netns}" if netns else ""
        raise NetlinkReadError(f"cannot open a netlink socket{where}: {e.strerror or e}") from None
    try:
        with sock:
            if names is None:
                links = tuple(sock.links())
            else:
                found = (sock.link(name=name) for name in names)
                links = tuple(link for link in found if link is not None)
            routes = sock.routes()
            addrs = sock.addresses()
    except OSError as e:
        raise _read_error(e) from None
    return Snapshot.of(links, routes, addrs)


# -- events ---------------------------------------------------------------------------------------

RTMGRP_LINK = 0x1
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
SO_RCVBUFFORCE = 33


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
            carrier = attrs.get(IFLA_CARRIER)
            events.append(
                LinkEvent(
                    deleted=kind == RTM_DELLINK,
                    index=index,
                    name=_text(attrs.get(IFLA_IFNAME)) or None,
                    admin_up=bool(flags & IFF_UP),
                    carrier=None if not carrier else bool(carrier[0]),
                )
            )
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and body + _RTMSG.size <= end:
            route = decode_route(data[body:end])
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
