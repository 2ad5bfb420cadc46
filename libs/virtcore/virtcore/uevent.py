"""Kernel uevents (NETLINK_KOBJECT_UEVENT): a socket subscribed to them and the parsed messages.

The kernel multicasts one message per device event (add, remove, bind, unbind, move, change) to
group 1. A net device's events go only to sockets of the network namespace that owns it;
events of devices without a namespace (PCI, virtio) go to every namespace. The socket is opened
in the calling thread's namespace: open it where the netdevs of interest live (stdlib only).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from virtcore import pci

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # udevd re-broadcasts on group 2 with a "libudev" header: not read here
SO_RCVBUFFORCE = 33


@dataclass(frozen=True)
class Uevent:
    action: str  # "add", "remove", "bind", "unbind", "move", "change", ...
    devpath: str  # "/devices/pci0000:00/0000:00:0a.0/virtio3/net/ens10"
    subsystem: Optional[str]  # "pci", "virtio", "net", ...
    env: Mapping[str, str]  # every KEY=VALUE of the message (INTERFACE, IFINDEX, DEVPATH_OLD)

    @property
    def pci_address(self) -> Optional[str]:
        """The PCI function the device is, or sits below: the last PCI address in its path."""
        return devpath_pci_address(self.devpath)


def devpath_pci_address(devpath: str) -> Optional[str]:
    for part in reversed(devpath.split("/")):
        if pci.is_pci_address(part):
            return pci.normalize(part)
    return None


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """Ask for `size` bytes of receive buffer; beyond rmem_max only root may (FORCE)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def open_socket(*, receive_buffer: Optional[int] = None) -> socket.socket:
    """A non-blocking socket bound to the kernel's uevent group, in this namespace."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_KOBJECT_UEVENT,
    )
    try:
        if receive_buffer:
            set_receive_buffer(sock, receive_buffer)
        sock.bind((0, KERNEL_GROUP))
    except BaseException:
        sock.close()
        raise
    return sock


def parse(data: bytes) -> Optional[Uevent]:
    """One datagram: `ACTION@DEVPATH\\0KEY=VALUE\\0...`; None for anything else."""
    parts = data.split(b"\0")
    head = parts[0].decode("utf-8", "replace")
    action, at, devpath = head.partition("@")
    if not at or not devpath.startswith("/"):
        return None  # e.g. udevd's "libudev" messages
    env = {}
    for raw in parts[1:]:
        key, eq, value = raw.decode("utf-8", "replace").partition("=")
        if eq:
            env[key] = value
    return Uevent(
        action=env.get("ACTION", action),
        devpath=env.get("DEVPATH", devpath),
        subsystem=env.get("SUBSYSTEM"),
        env=env,
    )
