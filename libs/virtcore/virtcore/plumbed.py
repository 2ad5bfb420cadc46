"""Finding the NICs ehost-device has plumbed, in every network namespace on the node.

A plumbed NIC carries ehost-device's mark in its link alias (`virtcore.alias`), and the alias
travels with the link, so the mark is what identifies it wherever it now is. Namespaces looked
at: the named ones (files under /var/run/netns, where CNI runtimes and `ip netns` put them) and
those of running processes (/proc/<pid>/ns/net), deduplicated by namespace inode.

Each namespace is read through a netlink socket made inside it by a short-lived thread of its
own (virtcore.netlink.socket_in); the current thread never changes namespace and nothing is
forked. A named namespace that vanished is an error, never created; process namespaces are
opened by file descriptor, which pins the namespace even if the process exits meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from virtcore import alias, netlink

NETNS_DIR = "/var/run/netns"
PROC_ROOT = "/proc"


@dataclass(frozen=True)
class Namespace:
    """One network namespace, as found on the node."""

    inode: int
    path: str  # what is opened to read it: a named netns file or /proc/<pid>/ns/net
    names: Tuple[str, ...] = ()  # names under the netns directory
    pid: Optional[int] = None  # lowest pid found living in it (None when only named)
    command: Optional[str] = None  # that process's comm
    is_host: bool = False  # the namespace of pid 1 (the node's own)
    is_current: bool = False  # the namespace this process runs in

    @property
    def label(self) -> str:
        if self.names:
            return ",".join(self.names)
        if self.is_host:
            return "host"
        if self.pid is not None:
            return f"pid:{self.pid}" + (f"({self.command})" if self.command else "")
        return f"netns:[{self.inode}]"


@dataclass(frozen=True)
class PlumbedNic:
    """A link carrying ehost-device's mark."""

    netns: Namespace
    ifname: str  # its name in that namespace (the pod-side name, e.g. net1)
    ifindex: int
    mark: alias.Mark  # host name, PCI address, what to restore
    mac: Optional[str] = None
    mtu: Optional[int] = None
    operstate: Optional[str] = None  # lower case, as sysfs and discovery show it: "up", ...
    admin_up: Optional[bool] = None
    addresses: Tuple[str, ...] = ()  # "198.51.100.7/24", IPv4 then IPv6, as the kernel lists

    @property
    def pci_address(self) -> str:
        return self.mark.pci_address

    @property
    def host_ifname(self) -> str:
        return self.mark.host_ifname


@dataclass(frozen=True)
class Scan:
    nics: Tuple[PlumbedNic, ...]
    namespaces: Tuple[Namespace, ...]  # every namespace looked at
    problems: Tuple[str, ...]  # namespaces that could not be read, one line each


def _inode_of(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _comm(proc_root: str, pid: int) -> Optional[str]:
    try:
        with open(os.path.join(proc_root, str(pid), "comm")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def namespaces(
    netns_dir: str = NETNS_DIR, proc_root: str = PROC_ROOT, *, processes: bool = True
) -> Tuple[List[Namespace], List[str]]:
    """Every network namespace found, deduplicated by inode, and one line per entry of
    `netns_dir` that is not a live namespace. Named ones first (by name), then by pid."""
    problems: List[str] = []
    nsfs = _inode_of("/proc/self/ns/net")
    nsfs_dev = nsfs[0] if nsfs else None
    host = _inode_of(os.path.join(proc_root, "1", "ns", "net")) if processes else None
    # key -> [path, names, pid]
    found: Dict[Tuple[int, int], List] = {}
    order: List[Tuple[int, int]] = []

    try:
        named = sorted(os.listdir(netns_dir))
    except FileNotFoundError:
        named = []
    except OSError as e:
        named = []
        problems.append(f"{netns_dir}: cannot list: {e.strerror or e}")
    for name in named:
        path = os.path.join(netns_dir, name)
        key = _inode_of(path)
        if key is None:
            problems.append(f"{path}: vanished or unreadable")
            continue
        if nsfs_dev is not None and key[0] != nsfs_dev:
            # An unmounted placeholder: `ip netns` left the file after the namespace died.
            problems.append(f"{path}: not a mounted network namespace (stale file)")
            continue
        if key not in found:
            found[key] = [path, [], None]
            order.append(key)
        found[key][1].append(name)

    if processes:
        try:
            pids = sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())
        except OSError as e:
            pids = []
            problems.append(f"{proc_root}: cannot list processes: {e.strerror or e}")
        for pid in pids:
            path = os.path.join(proc_root, str(pid), "ns", "net")
            key = _inode_of(path)
            if key is None:  # exited, or a kernel thread we may not look at
                continue
            if key not in found:
                found[key] = [path, [], pid]
                order.append(key)
            elif found[key][2] is None:
                found[key][2] = pid

    out = []
    for key in order:
        path, names, pid = found[key]
        out.append(
            Namespace(
                inode=key[1],
                path=path,
                names=tuple(names),
                pid=pid,
                command=_comm(proc_root, pid) if pid is not None else None,
                is_host=key == host,
                is_current=key == nsfs,
            )
        )
    return out, problems


def read_namespace(ns: Namespace) -> List[PlumbedNic]:
    """The marked links in one namespace. Raises OSError when it cannot be opened."""
    fd: Optional[int] = None
    try:
        if ns.is_current:
            sock = netlink.socket_in()
        elif ns.names:
            sock = netlink.socket_in(ns.path)
        else:
            fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_ino != ns.inode:
                raise ProcessLookupError(f"{ns.path}: the process now lives in another namespace")
            sock = netlink.socket_in(fd=fd)
    finally:
        if fd is not None:
            os.close(fd)
    with sock:
        marked = []
        for link in sock.links():
            mark = alias.decode(link.alias)
            if mark is not None:
                marked.append((link, mark))
        if not marked:
            return []
        addrs: Dict[int, List[str]] = {}
        for a in sock.addresses():
            addrs.setdefault(a["index"], []).append(f"{a['address']}/{a['prefixlen']}")
    return [
        PlumbedNic(
            netns=ns,
            ifname=link.name,
            ifindex=link.index,
            mark=mark,
            mac=link.mac,
            mtu=link.mtu,
            operstate=link.operstate,
            admin_up=link.admin_up,
            addresses=tuple(addrs.get(link.index, ())),
        )
        for link, mark in marked
    ]


def scan(
    netns_dir: str = NETNS_DIR,
    proc_root: str = PROC_ROOT,
    *,
    processes: bool = True,
    workers: int = 4,
) -> Scan:
    """Every plumbed NIC in every namespace, ordered by namespace then ifindex.

    Namespaces are read `workers` at a time.
    """
    nss, problems = namespaces(netns_dir, proc_root, processes=processes)

    def read(ns: Namespace) -> Tuple[List[PlumbedNic], Optional[str]]:
        try:
            return sorted(read_namespace(ns), key=lambda n: n.ifindex), None
        except Exception as e:  # noqa: BLE001 - one unreadable namespace must not hide the rest
            if not os.path.exists(ns.path):
                return [], None  # gone since it was listed (pod deleted, process exited)
            return [], f"{ns.path} ({ns.label}): cannot read links: {e}"

    if workers > 1 and len(nss) > 1:
        from concurrent import futures

        with futures.ThreadPoolExecutor(max_workers=min(workers, len(nss))) as pool:
            results = list(pool.map(read, nss))
    else:
        results = [read(ns) for ns in nss]
    nics: List[PlumbedNic] = []
    for found, problem in results:
        nics.extend(found)
        if problem:
            problems.append(problem)
    return Scan(nics=tuple(nics), namespaces=tuple(nss), problems=tuple(problems))
