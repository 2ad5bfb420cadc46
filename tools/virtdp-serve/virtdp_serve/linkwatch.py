"""Netlink link events of the daemon's own network namespace, fed to the inventory.

One thread holds an rtnetlink socket bound to the link multicast group (pyroute2, opened in the
current namespace: no fork, no setns) and, for every RTM_NEWLINK/RTM_DELLINK, updates the NIC's
health at once, and asks the scanner for a rescan when the event is about a link the inventory
does not know (new, renamed, moved or deleted links). On a
socket error (e.g. ENOBUFS after an event burst) it asks for a rescan and reopens the socket.
"""

from __future__ import annotations

import logging
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
