"""Link state of the daemon's own network namespace, fed to the inventory: netlink link events,
and a carrier probe for the one change the kernel announces late.

One thread holds an rtnetlink socket bound to the link multicast group (pyroute2, opened in the
current namespace: no fork, no setns) and, for every RTM_NEWLINK/RTM_DELLINK, updates the NIC's
health at once, and asks the scanner for a rescan when the event is about a link the inventory
does not know (new, renamed, moved or deleted links). On a
socket error (e.g. ENOBUFS after an event burst) it asks for a rescan and reopens the socket.

The kernel sends RTM_NEWLINK for a carrier change from its linkwatch work, which handles
ordinary NICs (virtio_net among them) at most once a second for the whole host: carrier *up*
is urgent and announced at once, carrier *loss* within a second of any other link event on the
node waits for the next round, up to 1 s. `CarrierProbe` closes that gap: every PROBE_INTERVAL
it asks the driver (ETHTOOL_GLINK ioctl, about a microsecond per NIC, no netlink dump, no sysfs)
whether the healthy, admin-up NICs still have carrier, and reports a loss at once. Everything
else (recovery, admin state, moves, new and deleted links) comes from the events.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import socket
import struct
import threading
import time
from typing import Any, Callable, Optional

from virtdp_serve.inventory import Inventory

log = logging.getLogger(__name__)

IFF_UP = 0x1


class LinkWatcher:
    def __init__(self, inventory: Inventory, request_rescan: Callable[[], None]) -> None:
        self._inventory = inventory
        self._request_rescan = request_rescan
        self._stop = threading.Event()
        self._ipr: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="link-watch", daemon=True)
        self.ready = threading.Event()  # set once the socket is bound

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            ipr, self._ipr = self._ipr, None
        if ipr is not None:
            try:
                ipr.close()  # unblocks get() in the watcher thread
            except Exception:  # noqa: BLE001 - closing is best effort at shutdown
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _open(self) -> Any:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        ipr = IPRoute()
        ipr.bind(groups=RTMGRP_LINK)
        return ipr

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                ipr = self._open()
            except Exception as e:  # noqa: BLE001
                failures += 1
                log.error("cannot open a netlink socket for link events: %s (retrying)", e)
                self._stop.wait(min(5.0, 0.2 * failures))
                continue
            with self._lock:
                if self._stop.is_set():
                    ipr.close()
                    return
                self._ipr = ipr
            self.ready.set()
            # Events between the last scan and the bind are caught by this rescan.
            self._request_rescan()
            try:
                self._loop(ipr)
                failures = 0
            except Exception as e:  # noqa: BLE001
                if self._stop.is_set():
                    return
                failures += 1
                log.warning("link event socket failed: %s; rescanning and reopening", e)
                self._request_rescan()
                with self._lock:
                    if self._ipr is ipr:
                        self._ipr = None
                try:
                    ipr.close()
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(min(2.0, 0.05 * failures))

    def _loop(self, ipr: Any) -> None:
        while not self._stop.is_set():
            msgs = ipr.get()
            if not msgs and self._stop.is_set():
                return
            for msg in msgs:
                self._handle(msg)

    def _handle(self, msg: Any) -> None:
        event = msg.get("event")
        if event not in ("RTM_NEWLINK", "RTM_DELLINK"):
            return
        carrier: Optional[int] = msg.get_attr("IFLA_CARRIER")
        log.debug(
            "%s %s index %s flags %#x carrier %s",
            event,
            msg.get_attr("IFLA_IFNAME"),
            msg["index"],
            msg["flags"],
            carrier,
        )
        if self._inventory.link_event(
            index=int(msg["index"]),
            ifname=msg.get_attr("IFLA_IFNAME"),
            admin_up=bool(msg["flags"] & IFF_UP),
            carrier=None if carrier is None else bool(carrier),
            deleted=event == "RTM_DELLINK",
        ):
            self._request_rescan()


SIOCETHTOOL = 0x8946
ETHTOOL_GLINK = 0x0000000A
IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux: 16-byte name, 24-byte union
PROBE_INTERVAL = 0.05


def link_detected(sock: socket.socket, ifname: str) -> Optional[bool]:
    """The driver's carrier bit (ethtool "Link detected"); None when it cannot say."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_GLINK, 0), 8)
    ifr = bytearray(
        struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(IFREQ_SIZE, b"\0")
    )
    try:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.ENXIO):
            return None
        raise
    return bool(struct.unpack("II", value.raw)[1])


class CarrierProbe:
    """Catches carrier loss and return on admin-up NICs within PROBE_INTERVAL."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carrier-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while not self._stop.wait(PROBE_INTERVAL):
                for pci_address, ifname in self._inventory.probe_targets():
                    try:
                        carrier = link_detected(sock, ifname)
                    except OSError as e:
                        log.debug("carrier probe of %s failed: %s", ifname, e)
                        continue
                    if carrier is not None:
                        self._inventory.carrier_probed(pci_address, ifname, carrier)
