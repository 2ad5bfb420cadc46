"""What wakes the daemon: kernel uevents, rtnetlink link and route events, file-system events of
the config and kubelet directories, and signals, all behind one selector. Nothing here polls: at
rest the daemon's main thread sleeps in `wait()` until the next resync is due.

The sockets are opened in the daemon's own network namespace, the one whose links it reads
(hostNetwork on a node; the test namespace under `ip netns exec` in tests): the kernel sends a
netdev's uevents and link events only to sockets of the namespace that owns the netdev. No
thread switches namespace and nothing forks.

Link notifications and linkwatch: the kernel announces a carrier change from its linkwatch
work. A change of a link whose iflink differs from its ifindex (a veth whose peer has another
index) is urgent and announced at once; for a NIC whose iflink equals its ifindex (virtio_net) a
carrier loss can wait for the next linkwatch round, up to about 1 s, while
/sys/class/net/<if>/carrier already shows it. The tests' veths were made in fresh namespaces
where both ends get index 2: linkwatch batches them like virtio_net, so the bench's carrier-loss
figure is that worst case. No probe closes the second (one ioctl per NIC every 50 ms cost more
than everything else at rest).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from virtcore import inotify, netlink, uevent

log = logging.getLogger(__name__)

DEFAULT_RECEIVE_BUFFER = 4 << 20  # per event socket; kernel memory, used only while backlogged
RECV_SIZE = 1 << 16
# Subsystems whose uevents can change a virtio NIC: the PCI function, its virtio device (bind,
# unbind) and its netdev (add, remove, move between namespaces, rename).
SUBSYSTEMS = frozenset({"pci", "virtio", "net"})


@dataclass
class Batch:
    """Everything that arrived since the last `wait()`, in arrival order per source."""

    uevents: List[uevent.Uevent] = field(default_factory=list)
    links: List[netlink.LinkEvent] = field(default_factory=list)
    default_route_changed: bool = False
    route_links: Set[int] = field(default_factory=set)  # ifindexes other routes go out through
    overflowed: Set[str] = field(default_factory=set)  # "uevent", "rtnetlink", "inotify"
    files: List[inotify.Event] = field(default_factory=list)
    signals: List[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.uevents
            or self.links
            or self.default_route_changed
            or self.route_links
            or self.overflowed
            or self.files
            or self.signals
        )


class EventSources:
    """The daemon's event sockets and watches. Call `close()` when done."""

    def __init__(self, *, receive_buffer: int = DEFAULT_RECEIVE_BUFFER) -> None:
        self._receive_buffer = receive_buffer
        self._selector = selectors.DefaultSelector()
        self._readers: Dict[str, Callable[[Batch], None]] = {}
        self._uevents: Optional[socket.socket] = None
        self._rtnl: Optional[socket.socket] = None
        self._inotify: Optional[inotify.Inotify] = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup_fd: Optional[int] = None
        try:
            self._open_uevents()
            self._open_rtnl()
            self._inotify = inotify.Inotify()
            self._selector.register(self._inotify.fileno(), selectors.EVENT_READ, "inotify")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "signal")
        except BaseException:
            self.close()
            raise

    # -- sockets ---------------------------------------------------------------------------
    def _open_uevents(self) -> None:
        self._uevents = uevent.open_socket(receive_buffer=self._receive_buffer)
        self._selector.register(self._uevents, selectors.EVENT_READ, "uevent")

    def _open_rtnl(self) -> None:
        self._rtnl = netlink.event_socket(receive_buffer=self._receive_buffer)
        self._selector.register(self._rtnl, selectors.EVENT_READ, "rtnetlink")

    def _reopen(self, name: str) -> None:
        old = self._uevents if name == "uevent" else self._rtnl
        if old is not None:
            self._selector.unregister(old)
            old.close()
        if name == "uevent":
            self._open_uevents()
        else:
            self._open_rtnl()

    def _drain(self, name: str, sock: socket.socket, batch: Batch) -> None:
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                batch.overflowed.add(name)
                if e.errno != errno.ENOBUFS:
                    # Not the expected overflow: start over on a fresh socket.
                    log.warning("%s event socket failed (%s); reopening it", name, e)
                    self._reopen(name)
                    return
                continue  # the kernel reports a loss once; what is queued after it is fine
            if name == "uevent":
                ev = uevent.parse(data)
                if ev is not None and ev.subsystem in SUBSYSTEMS:
                    batch.uevents.append(ev)
            else:
                for item in netlink.parse_events(data):
                    if isinstance(item, netlink.LinkEvent):
                        batch.links.append(item)
                    elif item.default:
                        batch.default_route_changed = True
                    else:
                        batch.route_links.update(item.oifs)

    def receive_buffers(self) -> Tuple[int, int]:
        """Receive buffer sizes the kernel granted (uevent, rtnetlink)."""
        sizes = [
            s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if s is not None else 0
            for s in (self._uevents, self._rtnl)
        ]
        return sizes[0], sizes[1]

    # -- directories -----------------------------------------------------------------------
    def watch_directory(self, path: str) -> bool:
        """Report changes of `path`'s entries; False (logged) when it cannot be watched now."""
        assert self._inotify is not None
        try:
            self._inotify.watch(path)
        except OSError as e:
            log.warning("cannot watch %s for changes: %s", path, e.strerror or e)
            return False
        return True

    def watching(self, path: str) -> bool:
        return self._inotify is not None and self._inotify.watching(path)

    # -- signals ---------------------------------------------------------------------------
    def catch_signals(self, *signums: int) -> None:
        """Deliver these signals as `Batch.signals` (the handlers only write to a pipe)."""
        for signum in signums:
            signal.signal(signum, self._on_signal)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, frame: object) -> None:
        pass  # set_wakeup_fd already wrote the signal number to the pipe

    # -- waiting ---------------------------------------------------------------------------
    def wait(self, timeout: Optional[float]) -> Batch:
        """Block until something arrives or `timeout` seconds pass; drain every ready source."""
        batch = Batch()
        for key, _ in self._selector.select(timeout):
            name = key.data
            if name in ("uevent", "rtnetlink"):
                self._drain(name, key.fileobj, batch)  # type: ignore[arg-type]
            elif name == "inotify":
                assert self._inotify is not None
                for ev in self._inotify.read():
                    if ev.overflow:
                        batch.overflowed.add("inotify")
                    else:
                        batch.files.append(ev)
            elif name == "signal":
                while True:
                    try:
                        data = os.read(self._wake_r, 512)
                    except (BlockingIOError, InterruptedError):
                        break
                    if not data:
                        break
                    batch.signals.extend(data)
        return batch

    def close(self) -> None:
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        for sock in (self._uevents, self._rtnl):
            if sock is not None:
                sock.close()
        self._uevents = self._rtnl = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        self._selector.close()
