"""The daemon's live device inventory: which NIC is in which pool, and whether it is healthy.

One function changes it from the node's state: `refresh(reason, addresses)` reads the given PCI
functions and their netdevs (virtcore discovery, for just those devices) and replaces their
entries; with no addresses it reads the whole node (a full rescan: at start, on a config reload,
after an event socket overflowed and as the slow --resync-interval safety net). Kernel events
call it with the one device they concern. A link event of a known netdev carries its state in
the message: `link_event` applies it without reading anything. Every change bumps `version` and
wakes the ListAndWatch streams, which send only when their pool's list really changed. Only
the daemon's event loop changes the inventory; the servicers read it from their threads.

Health rules: carrier lost on an admin-up NIC = Unhealthy, carrier present = Healthy; an
admin-down spare NIC is Healthy (ehost-device brings it up when plumbing it); a NIC whose netdev
is not in this namespace (inside a pod) keeps its last health and its pool.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from virtcore import claims, discovery, pools, sysfs
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
    # What a DRA ResourceSlice says about the NIC (the device plugin API has no room for it).
    carrier: Optional[bool] = None
    mac: Optional[str] = None
    vendor: Optional[str] = None
    device_id: Optional[str] = None
    pcie_root: Optional[str] = None

    @property
    def health(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY


# Why a NIC offered through DRA cannot be used now: the suffix of its taint key
# (`<driver domain>/<problem>`) in the ResourceSlice, and the message of its Unhealthy status.
NO_CARRIER = "no-carrier"
NO_NETDEV = "no-netdev"


@dataclass(frozen=True)
class DraDevice:
    """One NIC as the DRA side offers it (ResourceSlice device, health stream entry)."""

    name: str  # claims.device_name(pci_address)
    pci_address: str
    pool: str  # the virtdp pool it is in
    numa_node: Optional[int]
    mac: Optional[str]
    ifname: Optional[str]
    vendor: Optional[str]
    device_id: Optional[str]
    pcie_root: Optional[str]
    problem: Optional[str]  # None, NO_CARRIER or NO_NETDEV

    @property
    def healthy(self) -> bool:
        return self.problem is None


def dra_device(d: Device, *, held: bool) -> DraDevice:
    """`d` as a DRA device. `held`: a prepared claim holds it, so a netdev not in this namespace
    is in the claim's pod, not missing. A NIC in a pod keeps its last health (as for the
    device plugin); a spare NIC without its netdev here, or without carrier, has a problem."""
    problem: Optional[str] = None
    if not d.visible:
        if not held:
            problem = NO_NETDEV
        elif not d.healthy:
            problem = NO_CARRIER
    elif not d.healthy:
        problem = NO_CARRIER
    return DraDevice(
        name=claims.device_name(d.pci_address),
        pci_address=d.pci_address,
        pool=d.pool,
        numa_node=d.numa_node,
        mac=d.mac,
        ifname=d.ifname,
        vendor=d.vendor,
        device_id=d.device_id,
        pcie_root=d.pcie_root,
        problem=problem,
    )


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


Scanner = Callable[..., List[discovery.Nic]]


class Inventory:
    """Device state shared by the daemon's event loop (the only writer) and the servicers."""

    def __init__(
        self, sysfs_root: str, config: pools.Config, *, scanner: Optional[Scanner] = None
    ) -> None:
        self.sysfs_root = sysfs_root
        self._config = config
        self._scan: Scanner = scanner or discovery.discover
        self._devices: Dict[str, Device] = {}
        self.cond = threading.Condition()
        self.version = 0
        self._wakes = 0

    # -- reading ---------------------------------------------------------------------------
    def pool_devices(self, resource_name: str) -> Tuple[Device, ...]:
        with self.cond:
            return tuple(d for _, d in sorted(self._devices.items()) if d.pool == resource_name)

    def devices(self, pools: Iterable[str]) -> Tuple[Device, ...]:
        """The devices of these pools, sorted by PCI address."""
        wanted = set(pools)
        with self.cond:
            return tuple(d for _, d in sorted(self._devices.items()) if d.pool in wanted)

    def owners(self) -> Dict[str, str]:
        """PCI address -> pool, for every advertised device."""
        with self.cond:
            return {a: d.pool for a, d in self._devices.items()}

    def netdev_owners(self, *, ifname: Optional[str], ifindex: Optional[int]) -> Set[str]:
        """PCI addresses of the devices whose netdev has this name or index."""
        with self.cond:
            return {
                a
                for a, d in self._devices.items()
                if (ifname is not None and d.ifname == ifname)
                or (ifindex is not None and d.ifindex == ifindex)
            }

    def knows_link(self, ifindex: int) -> bool:
        """A device's netdev in this namespace has this index."""
        with self.cond:
            return any(d.visible and d.ifindex == ifindex for d in self._devices.values())

    @property
    def config(self) -> pools.Config:
        return self._config

    def wait_for_change(self, since: int, timeout: float) -> int:
        """Until `version` is no longer `since`, `wake()` is called, or `timeout` passes."""
        with self.cond:
            wakes = self._wakes
            self.cond.wait_for(
                lambda: self.version != since or self._wakes != wakes, timeout=timeout
            )
            return self.version

    def wake(self) -> None:
        """Wake every waiter without a change (a stream that must notice it is being stopped)."""
        with self.cond:
            self._wakes += 1
            self.cond.notify_all()

    # -- changing --------------------------------------------------------------------------
    def set_config(self, config: pools.Config) -> None:
        self._config = config
        self.refresh("config")

    def refresh(self, reason: str, addresses: Optional[Iterable[str]] = None) -> bool:
        """Read the node again and apply it: every device (`addresses` None: a full rescan,
        counted by `reason`) or only those PCI functions (counted as refreshes by `reason`, the
        event source); an address that is no virtio NIC any more leaves the inventory.
        Returns True when anything advertised changed. Raises DiscoveryError."""
        scope: Optional[Set[str]] = None
        if addresses is None:
            found = self._scan(self.sysfs_root)
            metrics.RESCANS.labels(reason).inc()
        else:
            scope = set(addresses)
            if not scope:
                return False
            found = self._scan(self.sysfs_root, only=sorted(scope))
            metrics.DEVICE_REFRESHES.labels(reason).inc(len(scope))
        config = self._config
        nics = pools.assign(config, found)
        pool_names = {p.resource_name for p in config.pools}
        with self.cond:
            new: Dict[str, Device] = {}
            if scope is not None:
                new = {a: d for a, d in self._devices.items() if a not in scope}
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
                healthy = health_of(
                    nic.visible, nic.admin_up, nic.carrier, old.healthy if old else None
                )
                numa = nic.numa_node if nic.numa_node is not None and nic.numa_node >= 0 else None
                new[nic.pci_address] = Device(
                    pci_address=nic.pci_address,
                    pool=pool,
                    healthy=healthy,
                    numa_node=numa,
                    ifname=nic.ifname,
                    ifindex=nic.ifindex,
                    visible=nic.visible,
                    admin_up=nic.admin_up,
                    carrier=nic.carrier,
                    mac=nic.mac,
                    vendor=nic.vendor,
                    device_id=nic.device,
                    pcie_root=(
                        old.pcie_root
                        if old is not None and old.pcie_root is not None
                        else sysfs.pcie_root(self.sysfs_root, nic.pci_address)
                    ),
                )
            changed = self._advertised(new) != self._advertised(self._devices)
            for addr in sorted(set(self._devices) - set(new)):
                log.info("device %s left pool %s", addr, self._devices[addr].pool)
            for addr in sorted(set(new) - set(self._devices)):
                log.info("device %s joined pool %s (%s)", addr, new[addr].pool, new[addr].health)
            for addr in sorted(set(new) & set(self._devices)):
                if new[addr].healthy != self._devices[addr].healthy:
                    log.info("device %s of %s is now %s", addr, new[addr].pool, new[addr].health)
            self._devices = new
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
    ) -> Optional[str]:
        """Apply one RTM_NEWLINK/DELLINK of this namespace to a known device's health.

        Returns the PCI address to `refresh` when the message alone cannot tell what happened
        (a deleted, moved or renamed netdev of one of our devices), else None. A link that is
        no device of ours is the caller's to look up.
        """
        with self.cond:
            dev = next(
                (
                    d
                    for d in self._devices.values()
                    if d.visible
                    and (d.ifindex == index or (d.ifindex is None and d.ifname == ifname))
                ),
                None,
            )
            if dev is None:
                return None
            if deleted or (ifname is not None and ifname != dev.ifname):
                return dev.pci_address
            healthy = health_of(True, admin_up, carrier, dev.healthy)
            if healthy and not dev.healthy and not admin_up:
                # Moving a link to another namespace downs it first: this may be an unhealthy
                # NIC on its way into a pod, which must keep its state. Its sysfs entry tells.
                return dev.pci_address
            if dev.admin_up != admin_up or (carrier is not None and dev.carrier != carrier):
                self._devices[dev.pci_address] = dev = replace(
                    dev, admin_up=admin_up, carrier=dev.carrier if carrier is None else carrier
                )
            if healthy == dev.healthy:
                return None
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
            return None

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _advertised(devs: Dict[str, Device]) -> Dict[str, Tuple[object, ...]]:
        # What either API shows: pool, health, NUMA node; and the DRA slice's attributes.
        return {
            a: (d.pool, d.healthy, d.numa_node, d.visible, d.ifname, d.mac, d.pcie_root)
            for a, d in devs.items()
        }

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
