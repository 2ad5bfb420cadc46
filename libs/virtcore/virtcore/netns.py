"""Moving a NIC between network namespaces and setting it up there, each step with its undo.

Plain functions over pyroute2. A namespace is reached by opening a netlink socket inside it
(`open_ns`), never by switching the calling thread's namespace. Every state-changing function
takes an optional `undo` ExitStack and, when given, registers its inverse there before it
returns, so a caller rolls back a half-done sequence by letting the stack unwind. Undo steps are
best effort: a failing one is logged and the rest still run.

On ehost-device's start path: Python 3.9+, pyroute2 is imported on first use only, and without
the package `__init__` that imports nearly all of pyroute2 (see `_pyroute2`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

log = logging.getLogger(__name__)

# Linux caps interface names at IFNAMSIZ - 1 bytes.
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000
IFF_UP = 0x1


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


_P2: Optional[Tuple[Any, Any]] = None


def _pyroute2() -> Tuple[Any, Any]:
    """(IPRoute, NetlinkError), imported lazily and lean.

    `import pyroute2` runs the package `__init__`, which imports nearly every pyroute2
    module (~180 ms here, most of a CNI call). When nothing has imported pyroute2 yet, a bare
    package module stands in for the `__init__` while the two modules we need load (~90 ms),
    and is removed again afterwards so that a later `import pyroute2` elsewhere in the process
    gets the real package.
    """
    global _P2
    if _P2 is not None:
        return _P2
    if "pyroute2" in sys.modules:
        from pyroute2.iproute.linux import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    else:
        import importlib.util
        import types

        spec = importlib.util.find_spec("pyroute2")
        if spec is None or not spec.submodule_search_locations:
            raise NetnsError("pyroute2 is not installed")
        stand_in = types.ModuleType("pyroute2")
        stand_in.__path__ = list(spec.submodule_search_locations)
        stand_in.__spec__ = spec
        sys.modules["pyroute2"] = stand_in
        try:
            from pyroute2.iproute.linux import IPRoute
            from pyroute2.netlink.exceptions import NetlinkError
        finally:
            if sys.modules.get("pyroute2") is stand_in:
                del sys.modules["pyroute2"]
    _P2 = (IPRoute, NetlinkError)
    return _P2


def _netlink_error() -> Any:
    return _pyroute2()[1]


def _errno_of(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
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


def check_namespace(path: str) -> None:
    """Raise NamespaceNotFound unless `path` is an existing network namespace file.

    Never creates anything: a missing namespace is the caller's error to report.
    """
    try:
        fd = os.open(_target(path), os.O_RDONLY)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NamespaceNotFound(f"cannot open network namespace {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        ns_self = os.stat("/proc/self/ns/net")
        # A network namespace file lives on nsfs; its device matches /proc/self/ns/net's.
        if st.st_dev != ns_self.st_dev:
            raise NamespaceNotFound(f"{path} is not a network namespace (not an nsfs file)")
    finally:
        os.close(fd)


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


_LIBC: Any = None


def _libc() -> Any:
    """The C library for pyroute2's namespace helper.

    Given none, the forked helper looks libc up with `ctypes.util.find_library`, which runs
    `ldconfig -p` in a subprocess: ~5 ms on every namespace socket. The process's own symbol
    table (`dlopen(NULL)`) already has `syscall`, on glibc and musl alike.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


@contextlib.contextmanager
def open_ns(path: Optional[str] = None) -> Iterator[Any]:
    """An IPRoute socket inside the namespace at `path` (None: the caller's own namespace).

    pyroute2 opens the socket in a forked helper, so the calling thread never changes its
    namespace; `flags=0` because pyroute2 would otherwise create a missing namespace.
    `groups=0`: we only ask and are answered, so the socket joins no multicast group and the
    kernel queues no notifications of our own link changes on it.
    """
    IPRoute, _ = _pyroute2()
    if path is None:
        ipr = IPRoute(groups=0)
    else:
        check_namespace(path)
        try:
            ipr = IPRoute(netns=_target(path), flags=0, groups=0, libc=_libc())
        except FileNotFoundError:
            raise NamespaceNotFound(f"network namespace {path} does not exist") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _unshare_net() -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(CLONE_NEWNET)
        return
    import ctypes

    libc = _libc()
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def temporary_namespace() -> Iterator[str]:
    """An anonymous network namespace for the duration of the block; yields its path.

    A forked child unshares a new namespace and waits; the namespace lives as long as the child
    or an open reference to it. Nothing is mounted or named, so nothing can leak: a physical
    NIC left inside when the namespace dies goes back to the initial namespace.
    """
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: unshare, report, wait for the parent to close its end
        status = 0
        try:
            # Keep only our two ends: in a threaded caller (the executor) another thread's
            # pipes are open here too, and holding another holder's `hold_w` would keep that
            # child (and the waitpid of its parent) alive until we exit, and so on in a circle.
            low, high = sorted((ready_w, hold_r))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, 1 << 20)
            try:
                _unshare_net()
                os.write(ready_w, b"1")
            except OSError as e:
                os.write(ready_w, str(e).encode()[:200] or b"0")
            os.read(hold_r, 1)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(hold_r)
    nsfd = -1
    try:
        answer = os.read(ready_r, 256)
        if answer != b"1":
            raise NetnsError(
                f"cannot make a temporary network namespace: {answer.decode(errors='replace')}"
            )
        path = f"/proc/{pid}/ns/net"
        # Hold a reference of our own, so the namespace outlives a child that died early.
        nsfd = os.open(path, os.O_RDONLY)
        yield f"/proc/{os.getpid()}/fd/{nsfd}"
    finally:
        os.close(ready_r)
        os.close(hold_w)
        if nsfd >= 0:
            os.close(nsfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def open_ns_fd(path: str) -> int:
    """An O_RDONLY fd for a namespace path (the caller closes it)."""
    try:
        return os.open(_target(path), os.O_RDONLY)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NamespaceNotFound(f"cannot open network namespace {path}: {e.strerror}") from None


# -- reading ------------------------------------------------------------------------------------


def _to_link(msg: Any) -> Link:
    kind = None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & IFF_UP),
        alias=msg.get_attr("IFLA_IFALIAS") or None,
        kind=kind,
    )


def links(ipr: Any) -> List[Link]:
    return [_to_link(m) for m in ipr.get_links()]


def link_by_name(ipr: Any, name: str) -> Optional[Link]:
    if not name or len(name.encode()) >= IFNAMSIZ:
        return None
    try:
        msgs = ipr.link("get", ifname=name)
    except _netlink_error() as e:
        if _errno_of(e) in (errno.ENODEV, errno.EINVAL):
            return None
        raise _fail(f"reading link {name}", e) from None
    return _to_link(msgs[0]) if msgs else None


def link_by_index(ipr: Any, index: int) -> Optional[Link]:
    try:
        msgs = ipr.link("get", index=index)
    except _netlink_error() as e:
        if _errno_of(e) == errno.ENODEV:
            return None
        raise _fail(f"reading link #{index}", e) from None
    return _to_link(msgs[0]) if msgs else None


def addresses(ipr: Any, index: int) -> List[str]:
    """The link's addresses in CIDR form (IPv6 link-local ones left out)."""
    out = []
    for m in ipr.get_addr(index=index):
        addr = m.get_attr("IFA_ADDRESS")
        if addr is None or addr.lower().startswith("fe80:"):
            continue
        out.append(f"{addr}/{m['prefixlen']}")
    return out


def routes(ipr: Any, index: Optional[int] = None) -> List[Route]:
    """Routes through the link (None: through any link), from every table but `local`."""
    out = []
    kw = {} if index is None else {"oif": index}
    for family in (socket.AF_INET, socket.AF_INET6):
        for m in ipr.get_routes(family=family, **kw):
            table = m.get_attr("RTA_TABLE") or m["table"]
            if table == 255:  # local table: kernel-made entries for our own addresses
                continue
            dst = m.get_attr("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if family == socket.AF_INET else "::"
            metrics = m.get_attr("RTA_METRICS")
            mtu = advmss = None
            if metrics is not None:
                mtu = metrics.get_attr("RTAX_MTU")
                advmss = metrics.get_attr("RTAX_ADVMSS")
            out.append(
                Route(
                    dst=f"{dst}/{m['dst_len']}",
                    gw=m.get_attr("RTA_GATEWAY"),
                    priority=m.get_attr("RTA_PRIORITY"),
                    table=table,
                    scope=m["scope"],
                    mtu=mtu,
                    advmss=advmss,
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


def _set(ipr: Any, index: int, what: str, **kw: Any) -> None:
    try:
        ipr.link("set", index=index, **kw)
    except _netlink_error() as e:
        raise _fail(what, e) from None


def _reset(ipr: Any, name: str, index: int, what: str, **kw: Any) -> None:
    """An undo's `_set` on the link now named `name` in `ipr`'s namespace.

    Undo steps run after the later steps were undone, so the link is back under the name it
    had right after this step, but maybe not under the same index: a move renumbers a link
    whose index is taken in the destination, and moving back keeps the new number.
    """
    now = link_by_name(ipr, name)
    _set(ipr, now.index if now is not None else index, what, **kw)


def set_up(
    ipr: Any, link: Link, up: bool = True, *, undo: Optional[contextlib.ExitStack] = None
) -> None:
    state = "up" if up else "down"
    _set(ipr, link.index, f"setting {link.name} {state}", state=state)
    if link.up != up:
        back = "up" if link.up else "down"
        _register(
            undo,
            f"{link.name} {state}",
            lambda: _reset(ipr, link.name, link.index, f"setting {link.name} {back}", state=back),
        )


def set_alias(
    ipr: Any, link: Link, alias: Optional[str], *, undo: Optional[contextlib.ExitStack] = None
) -> None:
    """Set (or, with None, clear) the link alias (IFLA_IFALIAS)."""
    _set(ipr, link.index, f"setting the alias of {link.name}", ifalias=alias or "")
    old = link.alias or ""
    _register(
        undo,
        f"alias of {link.name}",
        lambda: _reset(
            ipr, link.name, link.index, f"restoring the alias of {link.name}", ifalias=old
        ),
    )


def rename(ipr: Any, link: Link, name: str, *, undo: Optional[contextlib.ExitStack] = None) -> Link:
    """Rename a link (it must be down). Returns the renamed link."""
    if name == link.name:
        return link
    _set(ipr, link.index, f"renaming {link.name} to {name}", ifname=name)
    old = link.name
    _register(
        undo,
        f"rename {old} -> {name}",
        lambda: _reset(ipr, name, link.index, f"renaming {name} back to {old}", ifname=old),
    )
    return _replace(link, name=name)


def set_mtu(ipr: Any, link: Link, mtu: int, *, undo: Optional[contextlib.ExitStack] = None) -> Link:
    if mtu == link.mtu:
        return link
    _set(ipr, link.index, f"setting the MTU of {link.name} to {mtu}", mtu=mtu)
    old = link.mtu
    _register(
        undo,
        f"MTU of {link.name}",
        lambda: _reset(ipr, link.name, link.index, f"restoring the MTU of {link.name}", mtu=old),
    )
    return _replace(link, mtu=mtu)


def set_mac(ipr: Any, link: Link, mac: str, *, undo: Optional[contextlib.ExitStack] = None) -> Link:
    mac = mac.lower()
    if mac == link.mac:
        return link
    _set(ipr, link.index, f"setting the MAC of {link.name} to {mac}", address=mac)
    old = link.mac
    _register(
        undo,
        f"MAC of {link.name}",
        lambda: _reset(
            ipr, link.name, link.index, f"restoring the MAC of {link.name}", address=old
        ),
    )
    return _replace(link, mac=mac)


def move(
    src: Any,
    link: Link,
    dst: Any,
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
    kw = {} if name is None or name == link.name else {"ifname": name}
    fd = open_ns_fd(dst_path)
    try:
        _set(src, link.index, f"moving {link.name} into {dst_path}", net_ns_fd=fd, **kw)
    except LinkExists:
        if kw:
            _return_stray(dst, link, src_path)
        raise
    finally:
        os.close(fd)
    new_name = kw.get("ifname", link.name)
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
                kw_back["ifname"] = link.name
        fd_back = open_ns_fd(src_path)
        try:
            _set(dst, now.index, f"moving {now.name} back", net_ns_fd=fd_back, **kw_back)
        finally:
            os.close(fd_back)

    _register(undo, f"move of {link.name} into {dst_path}", back)
    return moved


def _return_stray(dst: Any, link: Link, src_path: str) -> None:
    """After a refused move-and-rename: if the link did arrive (under its old name), send it
    back, so that a failed move leaves the link where it was."""
    stray = link_by_name(dst, link.name)
    if stray is None or stray.mac != link.mac:
        return
    fd_back = open_ns_fd(src_path)
    try:
        _set(dst, stray.index, f"moving {stray.name} back", net_ns_fd=fd_back)
    except NetnsError as e:
        log.error("could not move %s back after a refused rename: %s", link.name, e)
    finally:
        os.close(fd_back)


def add_address(
    ipr: Any, link: Link, cidr: str, *, undo: Optional[contextlib.ExitStack] = None
) -> None:
    addr, _, plen = cidr.partition("/")
    kw: dict = {}
    if ":" in addr:
        # Duplicate address detection would hold the address "tentative" for a second or more,
        # and routes through it fail meanwhile; the IPAM plugin owns uniqueness.
        kw["flags"] = 0x02  # IFA_F_NODAD
    try:
        ipr.addr("add", index=link.index, address=addr, prefixlen=int(plen), **kw)
    except _netlink_error() as e:
        raise _fail(f"adding address {cidr} to {link.name}", e) from None

    def remove() -> None:
        with contextlib.suppress(_netlink_error()):
            ipr.addr("del", index=link.index, address=addr, prefixlen=int(plen))

    _register(undo, f"address {cidr} on {link.name}", remove)


def add_route(
    ipr: Any, link: Link, route: Route, *, undo: Optional[contextlib.ExitStack] = None
) -> None:
    kw: dict = {"dst": route.dst, "oif": link.index}
    if route.gw:
        kw["gateway"] = route.gw
    if route.priority is not None:
        kw["priority"] = route.priority
    if route.table is not None:
        kw["table"] = route.table
    if route.scope is not None:
        kw["scope"] = route.scope
    metrics = {}
    if route.mtu:
        metrics["RTAX_MTU"] = route.mtu
    if route.advmss:
        metrics["RTAX_ADVMSS"] = route.advmss
    if metrics:
        kw["metrics"] = {"attrs": list(metrics.items())}
    try:
        ipr.route("add", **kw)
    except _netlink_error() as e:
        via = f" via {route.gw}" if route.gw else ""
        raise _fail(f"adding route {route.dst}{via} on {link.name}", e) from None

    def remove() -> None:
        with contextlib.suppress(_netlink_error()):
            ipr.route("del", **kw)

    _register(undo, f"route {route.dst} on {link.name}", remove)


def _replace(link: Link, **kw: Any) -> Link:
    import dataclasses

    return dataclasses.replace(link, **kw)
