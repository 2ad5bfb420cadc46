"""The daemon's live device inventory: which NIC is in which pool, and whether it is healthy.

Two inputs change it. A full scan (`rescan`: virtcore discovery + pool assignment) runs at start,
periodically and after link events, and catches hot-plug, unplug, driver unbind/bind and
renames. A link event (`link_event`, from the netlink watcher) updates one NIC's health at once,
without waiting for a scan. Every change bumps `version` and wakes the ListAndWatch streams,
which send only when their pool's list really changed.

Health rules: carrier lost on an admin-up NIC = Unhealthy, carrier present = Healthy; an
admin-down spare NIC is Healthy (ehost-device brings it up when plumbing it); a NIC whose netdev
is not in this namespace (inside a pod) keeps its last health and its pool.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

from virtcore import discovery, pools
from virtdp_serve import metrics
from virtdp_serve.allocation import HEALTHY, UNHEALTHY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    pci_address: str
    pool: str
    healthy: bool
    numa_node: Optional[int]  # None when unknown (the kernel's -1 too)
    ifname: Optional[str]
    ifindex: Optional[int]
    visible: bool
    admin_up: Optional[bool] = None

    @property
    def health(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY


def health_of(
    visible: bool, admin_up: Optional[bool], carrier: Optional[bool], previous: Optional[bool]
) -> bool:
    """The health rules above; `previous` is the last known health (None for a new NIC)."""
    if not visible:
        return True if previous is None else previous
    if admin_up is False:
        return True
    if carrier is None:
        return True if previous is None else previous
    return carrier


Scanner = Callable[[str], List[discovery.Nic]]


class Inventory:
    """Thread-safe device state shared by the scanner, the link watcher and the servicers."""

    def __init__(
        self, sysfs_root: str, config: pools.Config, *, scanner: Optional[Scanner] = None
    ) -> None:
        self.sysfs_root = sysfs_root
        self._config = config
        self._scan = scanner or discovery.discover
        self._devices: Dict[str, Device] = {}
        self.cond = threading.Condition()
        self.version = 0
        self._event_seq = 0
        self._last_event: Dict[str, int] = {}  # pci address -> seq of its last link event
        self._scan_lock = threading.Lock()  # one scan at a time

    # -- reading ---------------------------------------------------------------------------
    def pool_devices(self, resource_name: str) -> Tuple[Device, ...]:
        with self.cond:
            return tuple(d for _, d in sorted(self._devices.items()) if d.pool == resource_name)

    def owners(self) -> Dict[str, str]:
        """PCI address -> pool, for every advertised device."""
        with self.cond:
            return {a: d.pool for a, d in self._devices.items()}

    @property
    def config(self) -> pools.Config:
        return self._config

    def wait_for_change(self, since: int, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.version != since, timeout=timeout)
            return self.version

    def wake(self) -> None:
        """Wake every waiter without a change (a stream that must notice it is being stopped)."""
        with self.cond:
            self.cond.notify_all()

    # -- changing --------------------------------------------------------------------------
    def set_config(self, config: pools.Config) -> None:
        self._config = config
        self.rescan("reload")

    def rescan(self, trigger: str) -> bool:
        """Full scan; returns True when anything advertised changed. Raises DiscoveryError."""
        with self._scan_lock:
            with self.cond:
                start_seq = self._event_seq
            config = self._config
            nics = pools.assign(config, self._scan(self.sysfs_root))
            metrics.INVENTORY_SCANS.labels(trigger).inc()
            pool_names = {p.resource_name for p in config.pools}
            with self.cond:
                new: Dict[str, Device] = {}
                for nic in nics:
                    old = self._devices.get(nic.pci_address)
                    pool = nic.pool
                    if pool is None and not nic.visible and old is not None:
                        # In a pod's namespace: ifName/MAC selectors cannot be checked from here,
                        # but it is still the node's device, allocated from its old pool.
                        if old.pool in pool_names and nic.eligible:
                            pool = old.pool
                    if pool is None:
                        continue
                    if old is not None and self._last_event.get(nic.pci_address, -1) > start_seq:
                        # A link event arrived while this scan ran: its health is newer.
                        healthy = old.healthy
                    else:
                        healthy = health_of(
                            nic.visible, nic.admin_up, nic.carrier, old.healthy if old else None
                        )
                    numa = (
                        nic.numa_node if nic.numa_node is not None and nic.numa_node >= 0 else None
                    )
                    new[nic.pci_address] = Device(
                        pci_address=nic.pci_address,
                        pool=pool,
                        healthy=healthy,
                        numa_node=numa,
                        ifname=nic.ifname,
                        ifindex=nic.ifindex,
                        visible=nic.visible,
                        admin_up=nic.admin_up,
                    )
                changed = self._advertised(new) != self._advertised(self._devices)
                for addr in set(self._devices) - set(new):
                    log.info("device %s left pool %s", addr, self._devices[addr].pool)
                for addr in set(new) - set(self._devices):
                    log.info(
                        "device %s joined pool %s (%s)", addr, new[addr].pool, new[addr].health
                    )
                self._devices = new
                self._last_event = {a: s for a, s in self._last_event.items() if a in new}
                if changed:
                    self._changed()
                else:
                    self._update_gauges()  # a reload may have added or removed empty pools
                return changed

    def link_event(
        self,
        *,
        index: int,
        ifname: Optional[str],
        admin_up: bool,
        carrier: Optional[bool],
        deleted: bool = False,
    ) -> bool:
        """Apply one RTM_NEWLINK/DELLINK of this namespace to a known device's health.

        Returns True when only a full rescan can tell what the event means: a link that is no
        device of ours (yet), a deleted or renamed one.
        """
        with self.cond:
            self._event_seq += 1
            dev = next(
                (
                    d
                    for d in self._devices.values()
                    if d.visible
                    and (d.ifindex == index or (d.ifindex is None and d.ifname == ifname))
                ),
                None,
            )
            if dev is None or deleted:
                return True
            self._last_event[dev.pci_address] = self._event_seq
            healthy = health_of(True, admin_up, carrier, dev.healthy)
            renamed = ifname is not None and ifname != dev.ifname
            if healthy and not dev.healthy and not admin_up:
                # Moving a link to another namespace downs it first: this may be an unhealthy
                # NIC on its way into a pod, which must keep its state. The scan tells.
                return True
            if dev.admin_up != admin_up:
                self._devices[dev.pci_address] = dev = replace(dev, admin_up=admin_up)
            if healthy == dev.healthy:
                return renamed
            log.info(
                "device %s (%s) of %s is now %s (admin %s, carrier %s)",
                dev.pci_address,
                ifname or dev.ifname,
                dev.pool,
                HEALTHY if healthy else UNHEALTHY,
                "up" if admin_up else "down",
                carrier,
            )
            self._devices[dev.pci_address] = replace(dev, healthy=healthy)
            self._changed()
            return renamed

    def probe_targets(self) -> List[Tuple[str, str]]:
        """(PCI address, ifname) of visible, admin-up devices: where a carrier change must be
        caught before the kernel gets round to announcing it (it batches link notifications
        to about one a second)."""
        with self.cond:
            return [
                (d.pci_address, d.ifname)
                for d in self._devices.values()
                if d.visible and d.admin_up and d.ifname
            ]

    def carrier_probed(self, pci_address: str, ifname: str, carrier: bool) -> bool:
        """The carrier probe read `carrier` on an admin-up device: apply it if health differs."""
        with self.cond:
            dev = self._devices.get(pci_address)
            if dev is None or not dev.admin_up or dev.ifname != ifname or dev.healthy == carrier:
                return False
            self._event_seq += 1
            self._last_event[pci_address] = self._event_seq
            log.info(
                "device %s (%s) of %s is now %s (carrier %s)",
                pci_address,
                ifname,
                dev.pool,
                HEALTHY if carrier else UNHEALTHY,
                "back" if carrier else "lost",
            )
            self._devices[pci_address] = replace(dev, healthy=carrier)
            self._changed()
            return True

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _advertised(devs: Dict[str, Device]) -> Dict[str, Tuple[str, bool, Optional[int]]]:
        return {a: (d.pool, d.healthy, d.numa_node) for a, d in devs.items()}

    def _changed(self) -> None:
        # Called with self.cond held.
        self.version += 1
        self._update_gauges()
        self.cond.notify_all()

    def _update_gauges(self) -> None:
        counts: Dict[Tuple[str, str], int] = {}
        for p in self._config.pools:
            counts[(p.resource_name, HEALTHY)] = 0
            counts[(p.resource_name, UNHEALTHY)] = 0
        for d in self._devices.values():
            counts[(d.pool, d.health)] = counts.get((d.pool, d.health), 0) + 1
        for (pool, health), n in counts.items():
            metrics.DEVICES.labels(pool, health).set(n)
