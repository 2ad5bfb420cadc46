"""Moving a NIC between network namespaces and setting it up there, each step with its undo.

Plain functions over a `virtcore.netlink.Socket`. A namespace is reached by a netlink socket made
inside it (`open_ns`: a short-lived thread enters the namespace, makes the socket and ends; the
socket stays bound to that namespace), never by switching the namespace of a thread that does
other work, and never by forking. Every state-changing function takes an optional `undo`
ExitStack and, when given, registers its inverse there before it returns, so a caller rolls back
a half-done sequence by letting the stack unwind. Undo steps are best effort: a failing one is
logged and the rest still run.

On ehost-device's start path: Python 3.9+, stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

from virtcore import netlink

log = logging.getLogger(__name__)

# Linux caps interface names at IFNAMSIZ - 1 bytes.
IFNAMSIZ = 16
IFA_F_NODAD = 0x02


class NetnsError(Exception):
    """A namespace or link operation failed; the message says which and why."""


class NamespaceNotFound(NetnsError):
    pass


class LinkNotFound(NetnsError):
    pass


class LinkExists(NetnsError):
    pass


@dataclass(frozen=True)
class Link:
    """One link as netlink shows it in the namespace it was read from."""

    index: int
    name: str
    mac: str
    mtu: int
    up: bool  # administratively up (IFF_UP)
    alias: Optional[str]
    kind: Optional[str] = None  # IFLA_INFO_KIND ("veth", ...); None for a physical NIC


@dataclass(frozen=True)
class Route:
    dst: str  # CIDR; "0.0.0.0/0" or "::/0" for a default route
    gw: Optional[str] = None
    priority: Optional[int] = None
    table: Optional[int] = None
    scope: Optional[int] = None
    mtu: Optional[int] = None
    advmss: Optional[int] = None


def _errno_of(exc: BaseException) -> Optional[int]:
    return getattr(exc, "errno", None)


def _fail(what: str, exc: BaseException) -> NetnsError:
    code = _errno_of(exc)
    reason = os.strerror(code) if code else str(exc)
    if code == errno.ENODEV:
        return LinkNotFound(f"{what}: {reason}")
    if code == errno.EEXIST:
        return LinkExists(f"{what}: {reason}")
    return NetnsError(f"{what}: {reason}")


# -- namespaces ---------------------------------------------------------------------------------


def _open(path: str) -> int:
    """An O_RDONLY descriptor of the network namespace `path` (the caller closes it). Raises
    NamespaceNotFound unless `path` is an existing namespace file; never creates anything."""
    try:
        fd = os.open(_target(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NamespaceNotFound(f"cannot open network namespace {path}: {e.strerror}") from None
    try:
        # A network namespace file lives on nsfs; its device matches /proc/self/ns/net's.
        if os.fstat(fd).st_dev != os.stat("/proc/self/ns/net").st_dev:
            raise NamespaceNotFound(f"{path} is not a network namespace (not an nsfs file)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_namespace(path: str) -> None:
    """Raise NamespaceNotFound unless `path` is an existing network namespace file.

    Never creates anything: a missing namespace is the caller's error to report.
    """
    os.close(_open(path))


def is_own(path: str) -> bool:
    """Whether `path` is the calling process's own network namespace (False if unreadable).

    Two references to one namespace stat to the same nsfs inode.
    """
    try:
        st = os.stat(_target(path))
        own = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


_PINS = threading.local()


@contextlib.contextmanager
def pinned(path: str, fd: Optional[int], error: int = 0) -> Iterator[None]:
    """Within the block, and in the calling thread only, the namespace `path` means the open
    descriptor `fd` (or, with `fd` None, a path that failed to open with errno `error`).

    The executor is handed the pod's namespace as a descriptor and must act on it, never on
    the path, which may mean something else in its own mount namespace; messages and results
    still name `path`, as in-process mode does.
    """
    pins = getattr(_PINS, "map", None)
    if pins is None:
        pins = _PINS.map = {}
    pins[path] = (fd, error)
    try:
        yield
    finally:
        pins.pop(path, None)


def _target(path: str) -> str:
    """What to open for the namespace `path`: the pinned descriptor's /proc path, else `path`.
    A pin without a descriptor raises the errno its opening failed with."""
    pin = getattr(_PINS, "map", {}).get(path)
    if pin is None:
        return path
    fd, error = pin
    if fd is None:
        raise OSError(error or errno.ENOENT, os.strerror(error or errno.ENOENT), path)
    return f"/proc/{os.getpid()}/fd/{fd}"


@contextlib.contextmanager
def open_ns(path: Optional[str] = None) -> Iterator[netlink.Socket]:
    """A netlink socket inside the namespace at `path` (None: the caller's own namespace).

    Made by a thread of its own that enters the namespace and ends (`netlink.socket_in`): the
    calling thread never changes its namespace, and nothing is forked. A missing namespace is
    NamespaceNotFound, never created.
    """
    if path is None:
        sock = netlink.socket_in()
    else:
        fd = _open(path)
        try:
            sock = netlink.socket_in(fd=fd)
        except OSError as e:
            if e.errno == errno.EINVAL:  # an nsfs file of another kind of namespace
                raise NamespaceNotFound(
                    f"cannot enter network namespace {path}: it is not a network namespace"
                ) from None
            raise _fail(f"cannot enter network namespace {path}", e) from None
        finally:
            os.close(fd)
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def temporary_namespace() -> Iterator[str]:
    """An anonymous network namespace for the duration of the block; yields its path.

    A thread of its own unshares a new namespace, opens a reference to it and ends; the
    namespace lives as long as that reference. Nothing is forked, mounted or named, so nothing
    can leak: a physical NIC left inside when the namespace dies goes back to the initial
    namespace.
    """

    def make() -> int:
        netlink.unshare()
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    try:
        nsfd = netlink.in_thread(make)
    except OSError as e:
        raise NetnsError(f"cannot make a temporary network namespace: {e.strerror or e}") from None
    try:
        yield f"/proc/{os.getpid()}/fd/{nsfd}"
    finally:
        os.close(nsfd)


def open_ns_fd(path: str) -> int:
    """An O_RDONLY fd for a namespace path (the caller closes it)."""
    return _open(path)


# -- reading ------------------------------------------------------------------------------------


def _to_link(link: netlink.Link) -> Link:
    return Link(
        index=link.index,
        name=link.name,
        mac=(link.mac or "").lower(),
        mtu=link.mtu or 0,
        up=link.admin_up,
        alias=link.alias,
        kind=link.kind,
    )


def links(sock: netlink.Socket) -> List[Link]:
    try:
        return [_to_link(link) for link in sock.links()]
    except OSError as e:
        raise _fail("reading links", e) from None


def link_by_name(sock: netlink.Socket, name: str) -> Optional[Link]:
    if not name or len(name.encode()) >= IFNAMSIZ:
        return None
    try:
        link = sock.link(name=name)
    except OSError as e:
        if _errno_of(e) == errno.EINVAL:
            return None
        raise _fail(f"reading link {name}", e) from None
    return _to_link(link) if link is not None else None


def link_by_index(sock: netlink.Socket, index: int) -> Optional[Link]:
    try:
        link = sock.link(index=index)
    except OSError as e:
        raise _fail(f"reading link #{index}", e) from None
    return _to_link(link) if link is not None else None


def addresses(sock: netlink.Socket, index: int) -> List[str]:
    """The link's addresses in CIDR form (IPv6 link-local ones left out)."""
    try:
        found = sock.addresses()
    except OSError as e:
        raise _fail(f"reading the addresses of link #{index}", e) from None
    out = []
    for a in found:
        addr = a["address"]
        if a["index"] != index or addr is None or addr.lower().startswith("fe80:"):
            continue
        out.append(f"{addr}/{a['prefixlen']}")
    return out


def routes(sock: netlink.Socket, index: Optional[int] = None) -> List[Route]:
    """Routes through the link (None: through any link), from every table but `local`."""
    out = []
    try:
        found = sock.routes()
    except OSError as e:
        raise _fail("reading routes", e) from None
    for m in found:
        if m["table"] == netlink.RT_TABLE_LOCAL:  # kernel-made, for our own addresses
            continue
        if index is not None and m.get("oif") != index:
            continue
        dst = m.get("dst") or ("0.0.0.0" if m["family"] == socket.AF_INET else "::")
        out.append(
            Route(
                dst=f"{dst}/{m['dst_len']}",
                gw=m.get("gateway"),
                priority=m.get("priority"),
                table=m["table"],
                scope=m["scope"],
                mtu=m.get("mtu"),
                advmss=m.get("advmss"),
            )
        )
    return out


# -- changing -----------------------------------------------------------------------------------


def _register(undo: Optional[contextlib.ExitStack], what: str, fn: Callable[[], None]) -> None:
    if undo is None:
        return

    def run() -> None:
        try:
            fn()
            log.debug("undone: %s", what)
        except Exception as e:  # best effort: the rest of the undo must still run
            log.error("could not undo %s: %s", what, e)

    undo.callback(run)


def _set(sock: netlink.Socket, index: int, what: str, **kw: Any) -> None:
    """`netlink.Socket.set_link` with errors as NetnsError saying `what` failed."""
    try:
        sock.set_link(index, **kw)
    except OSError as e:
        raise _fail(what, e) from None


def _reset(sock: netlink.Socket, current: str, index: int, what: str, **kw: Any) -> None:
    """An undo's `_set` on the link now named `current` in `sock`'s namespace.

    Undo steps run after the later steps were undone, so the link is back under the name it
    had right after this step, but maybe not under the same index: a move renumbers a link
    whose index is taken in the destination, and moving back keeps the new number.
    """
    now = link_by_name(sock, current)
    _set(sock, now.index if now is not None else index, what, **kw)


def set_up(
    sock: netlink.Socket,
    link: Link,
    up: bool = True,
    *,
    undo: Optional[contextlib.ExitStack] = None,
) -> None:
    state = "up" if up else "down"
    _set(sock, link.index, f"setting {link.name} {state}", up=up)
    if link.up != up:
        back = "up" if link.up else "down"
        _register(
            undo,
            f"{link.name} {state}",
            lambda: _reset(sock, link.name, link.index, f"setting {link.name} {back}", up=link.up),
        )


def set_alias(
    sock: netlink.Socket,
    link: Link,
    alias: Optional[str],
    *,
    undo: Optional[contextlib.ExitStack] = None,
) -> None:
    """Set (or, with None, clear) the link alias (IFLA_IFALIAS)."""
    _set(sock, link.index, f"setting the alias of {link.name}", alias=alias or "")
    old = link.alias or ""
    _register(
        undo,
        f"alias of {link.name}",
        lambda: _reset(
            sock, link.name, link.index, f"restoring the alias of {link.name}", alias=old
        ),
    )


def rename(
    sock: netlink.Socket, link: Link, name: str, *, undo: Optional[contextlib.ExitStack] = None
) -> Link:
    """Rename a link (it must be down). Returns the renamed link."""
    if name == link.name:
        return link
    _set(sock, link.index, f"renaming {link.name} to {name}", name=name)
    old = link.name
    _register(
        undo,
        f"rename {old} -> {name}",
        lambda: _reset(sock, name, link.index, f"renaming {name} back to {old}", name=old),
    )
    return _replace(link, name=name)


def set_mtu(
    sock: netlink.Socket, link: Link, mtu: int, *, undo: Optional[contextlib.ExitStack] = None
) -> Link:
    if mtu == link.mtu:
        return link
    _set(sock, link.index, f"setting the MTU of {link.name} to {mtu}", mtu=mtu)
    old = link.mtu
    _register(
        undo,
        f"MTU of {link.name}",
        lambda: _reset(sock, link.name, link.index, f"restoring the MTU of {link.name}", mtu=old),
    )
    return _replace(link, mtu=mtu)


def set_mac(
    sock: netlink.Socket, link: Link, mac: str, *, undo: Optional[contextlib.ExitStack] = None
) -> Link:
    mac = mac.lower()
    if mac == link.mac:
        return link
    _set(sock, link.index, f"setting the MAC of {link.name} to {mac}", mac=mac)
    old = link.mac
    _register(
        undo,
        f"MAC of {link.name}",
        lambda: _reset(sock, link.name, link.index, f"restoring the MAC of {link.name}", mac=old),
    )
    return _replace(link, mac=mac)


def move(
    src: netlink.Socket,
    link: Link,
    dst: netlink.Socket,
    dst_path: str,
    src_path: str,
    *,
    name: Optional[str] = None,
    undo: Optional[contextlib.ExitStack] = None,
) -> Link:
    """Move `link` from the namespace of socket `src` into the one at `dst_path` (socket `dst`).

    Returns the link as the destination shows it (the kernel may give it a new index).

    Without `name` the link keeps its name: a clash in the destination fails with LinkExists
    and leaves the link where it was. The undo moves it back into `src_path`.

    With `name` the move and the rename are one request: the kernel renames the link as it
    arrives, under the rtnl lock, so the source namespace never sees the new name and a
    destination link named like the old one is no clash. Should the new name be taken in the
    destination, the kernel may have moved the link before refusing the rename: it is moved
    back and LinkExists raised. The undo gives the link its old name back where it is, then
    moves it back (one request again when the old name is taken there), so `src_path` never
    sees the new name either.
    """
    kw = {} if name is None or name == link.name else {"name": name}
    fd = open_ns_fd(dst_path)
    try:
        _set(src, link.index, f"moving {link.name} into {dst_path}", netns_fd=fd, **kw)
    except LinkExists:
        if kw:
            _return_stray(dst, link, src_path)
        raise
    finally:
        os.close(fd)
    new_name = kw.get("name", link.name)
    moved = link_by_name(dst, new_name)
    if moved is None:
        raise LinkNotFound(f"{link.name} vanished while moving into {dst_path}")

    def back() -> None:
        now = link_by_name(dst, moved.name) or moved
        kw_back = {}
        if now.name != link.name:
            try:
                if link_by_name(dst, link.name) is not None:
                    raise LinkExists(f"{link.name} is taken in {dst_path}")
                now = rename(dst, now, link.name)
            except NetnsError:  # the kernel renames it as it arrives instead
                kw_back["name"] = link.name
        fd_back = open_ns_fd(src_path)
        try:
            _set(dst, now.index, f"moving {now.name} back", netns_fd=fd_back, **kw_back)
        finally:
            os.close(fd_back)

    _register(undo, f"move of {link.name} into {dst_path}", back)
    return moved


def _return_stray(dst: netlink.Socket, link: Link, src_path: str) -> None:
    """After a refused move-and-rename: if the link did arrive (under its old name), send it
    back, so that a failed move leaves the link where it was."""
    stray = link_by_name(dst, link.name)
    if stray is None or stray.mac != link.mac:
        return
    fd_back = open_ns_fd(src_path)
    try:
        _set(dst, stray.index, f"moving {stray.name} back", netns_fd=fd_back)
    except NetnsError as e:
        log.error("could not move %s back after a refused rename: %s", link.name, e)
    finally:
        os.close(fd_back)


def add_address(
    sock: netlink.Socket, link: Link, cidr: str, *, undo: Optional[contextlib.ExitStack] = None
) -> None:
    addr, _, plen = cidr.partition("/")
    # Duplicate address detection would hold an IPv6 address "tentative" for a second or more,
    # and routes through it fail meanwhile; the IPAM plugin owns uniqueness.
    flags = IFA_F_NODAD if ":" in addr else 0
    try:
        sock.address(True, link.index, addr, int(plen), flags)
    except OSError as e:
        raise _fail(f"adding address {cidr} to {link.name}", e) from None

    def remove() -> None:
        with contextlib.suppress(netlink.NetlinkError):
            sock.address(False, link.index, addr, int(plen))

    _register(undo, f"address {cidr} on {link.name}", remove)


def add_route(
    sock: netlink.Socket, link: Link, route: Route, *, undo: Optional[contextlib.ExitStack] = None
) -> None:
    kw: Any = dict(
        oif=link.index,
        gateway=route.gw,
        priority=route.priority,
        table=route.table,
        scope=route.scope,
        mtu=route.mtu,
        advmss=route.advmss,
    )
    try:
        sock.route(True, route.dst, **kw)
    except OSError as e:
        via = f" via {route.gw}" if route.gw else ""
        raise _fail(f"adding route {route.dst}{via} on {link.name}", e) from None

    def remove() -> None:
        with contextlib.suppress(netlink.NetlinkError):
            sock.route(False, route.dst, **kw)

    _register(undo, f"route {route.dst} on {link.name}", remove)


def _replace(link: Link, **kw: Any) -> Link:
    import dataclasses

    return dataclasses.replace(link, **kw)
