"""The virtdp-serve daemon: one PoolPlugin per device-plugin pool and, with DRA on, one
DraPlugin for the DRA pools, over one shared Inventory, and the event loop that keeps them right.

Modes: device plugin only (the default), DRA only, or both. Every NIC is in at most one pool
(pools.assign), and every pool is served by exactly one side: with both, the pools named by
--dra-pools go to DRA and the others stay device-plugin pools, so no NIC is offered twice.

The main thread runs `run()`: it sleeps in one selector (events.EventSources) until a kernel
event, a change in the config file's or the kubelet's directory, or a signal arrives, or the
next resync is due, and then acts, so all reconfiguration and every inventory change happen on
this one thread. A uevent or link event re-reads only the device it concerns; a full rescan
runs at start, every --resync-interval (the safety net), at once after an event socket
overflowed, on a config reload, a kubelet restart and a default-route change. Other threads:
one registrar per pool, the gRPC servers' workers, the metrics HTTP server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from virtcore import discovery, pools, sysfs
from virtcore.kubelet import registration
from virtdp_serve import claimstatus, metrics, slices
from virtdp_serve.dra import DEFAULT_API_TIMEOUT, DraPlugin, kube_reader
from virtdp_serve.events import DEFAULT_RECEIVE_BUFFER, Batch, EventSources
from virtdp_serve.inventory import Inventory
from virtdp_serve.plugin import PoolPlugin, file_identity
from virtdp_serve.prepare import ClaimRef

log = logging.getLogger(__name__)

DEFAULT_RESYNC_INTERVAL = 60.0
# Only while a watched directory is missing (deleted under us): look for it this often.
MISSING_DIR_RETRY = 1.0


def _read_bytes(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


@dataclass(frozen=True)
class DraOptions:
    """How the DRA side runs (None in device-plugin mode)."""

    driver: str
    node: str
    registry_dir: str
    plugins_dir: str
    state_dir: str
    pools: Optional[Tuple[str, ...]]  # served through DRA; None: every pool (DRA only)
    kube: Any  # virtcore.kubeapi.Kube: claims, slices and claim status go through it
    api_timeout: float = DEFAULT_API_TIMEOUT


class Daemon:
    def __init__(
        self,
        *,
        config: pools.Config,
        config_path: Optional[str],
        device_plugin_dir: str,
        devinfo_dir: str,
        sysfs_root: str,
        metrics_address: Optional[str] = None,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
        event_buffer: int = DEFAULT_RECEIVE_BUFFER,
        device_plugin: bool = True,
        dra: Optional[DraOptions] = None,
    ) -> None:
        self.device_plugin = device_plugin
        self.dra_options = dra
        self.dra: Optional[DraPlugin] = None
        self.config_path = config_path
        self.config_dir = os.path.dirname(os.path.abspath(config_path)) if config_path else None
        self.device_plugin_dir = device_plugin_dir
        self.devinfo_dir = devinfo_dir
        self.sysfs_root = sysfs_root
        self.resync_interval = resync_interval
        self.kubelet_socket = registration.kubelet_socket(device_plugin_dir)
        self.inventory = Inventory(sysfs_root, config)
        self.plugins: Dict[str, PoolPlugin] = {}
        self._stopping = False
        self._config_bytes = _read_bytes(config_path)
        self._kubelet_id = file_identity(self.kubelet_socket)
        self._last_kubelet_id = self._kubelet_id
        self._refresh_failures = 0
        self._metrics: Optional[metrics.MetricsServer] = None
        if metrics_address is not None:
            # Bound here, before any plugin socket exists: a bad address fails the start.
            self._metrics = metrics.MetricsServer(metrics_address, self.ready)
        self._event_buffer = event_buffer
        self._sources: Optional[EventSources] = None
        self.publisher: Optional[slices.Publisher] = None
        self.status_writer: Optional[claimstatus.StatusWriter] = None
        if dra is not None:
            self.publisher = slices.Publisher(dra.kube, node=dra.node, driver=dra.driver)
            self.dra = DraPlugin(
                driver=dra.driver,
                node=dra.node,
                registry_dir=dra.registry_dir,
                plugins_dir=dra.plugins_dir,
                state_dir=dra.state_dir,
                inventory=self.inventory,
                pools=self.dra_pools,
                reader=kube_reader(dra.kube),
                api_timeout=dra.api_timeout,
                on_devices=self.publisher.update,
                on_claims=self._claims_changed,
            )
            self.status_writer = claimstatus.StatusWriter(
                dra.kube, driver=dra.driver, state_dir=dra.state_dir, prepared=self._prepared
            )

    # -- which side serves which pool ------------------------------------------------------
    def is_dra_pool(self, resource_name: str) -> bool:
        if self.dra_options is None:
            return False
        wanted = self.dra_options.pools
        return wanted is None or resource_name in wanted

    def dra_pools(self) -> List[str]:
        return [
            p.resource_name
            for p in self.inventory.config.pools
            if self.is_dra_pool(p.resource_name)
        ]

    def _is_device_plugin_pool(self, resource_name: str) -> bool:
        return self.device_plugin and not self.is_dra_pool(resource_name)

    def _prepared(self) -> List[Tuple[str, str, str]]:
        assert self.dra is not None
        return [(c.uid, c.namespace, c.name) for c in self.dra.prepared().values()]

    def _claims_changed(self, changed: Sequence[ClaimRef]) -> None:
        if self.status_writer is not None:
            for ref in changed:
                self.status_writer.claim_changed(ref.uid, ref.namespace, ref.name)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Event sockets, first scan, then every pool's server (each then registers by
        itself). The sockets are bound before the scan: nothing between the two is lost."""
        self._sources = EventSources(receive_buffer=self._event_buffer)
        log.info(
            "listening to kernel events (receive buffers: uevent %d, rtnetlink %d bytes); "
            "full resync every %gs",
            *self._sources.receive_buffers(),
            self.resync_interval,
        )
        self.inventory.refresh("start")
        if self._metrics is not None:
            self._metrics.start()
            log.info("metrics on port %d (/metrics, /healthz, /readyz)", self._metrics.port)
        if self.dra is not None:
            assert self.publisher is not None and self.status_writer is not None
            self.publisher.start()
            self.dra.start()  # reads the claim record, serves, hands the first device list
            self.status_writer.start()
        if self.device_plugin:
            os.makedirs(self.device_plugin_dir, exist_ok=True)
        self._watch_directories()
        for pool in self.inventory.config.pools:
            if self._is_device_plugin_pool(pool.resource_name):
                self._add_plugin(pool.resource_name)
        if self.device_plugin and self._kubelet_id is None:
            log.info(
                "no kubelet at %s yet; pools will register when it appears", self.kubelet_socket
            )

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""
        assert self._sources is not None
        self._sources.catch_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        next_resync = time.monotonic() + self.resync_interval
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = max(0.0, next_resync - now)
                if not self._all_watched():
                    timeout = min(timeout, MISSING_DIR_RETRY)
                batch = self._sources.wait(timeout)
                self.handle(batch)
                if self._stopping:
                    break
                if not self._all_watched():
                    self._watch_directories()
                if time.monotonic() >= next_resync:
                    self._refresh("resync")
                    if self.dra is not None:
                        self.dra.check_sockets()
                        self.dra.publish()
                    next_resync = time.monotonic() + self.resync_interval
        finally:
            self.shutdown()
        return 0

    def request_stop(self) -> None:
        self._stopping = True

    def shutdown(self) -> None:
        """Stop the servers, remove our sockets and devinfo files. Idempotent."""
        self._stopping = True
        log.info("stopping: removing sockets and device-info files")
        for plugin in list(self.plugins.values()):
            plugin.stop()
        if self.dra is not None:
            self.dra.stop()
        for part in (self.status_writer, self.publisher):
            if part is not None:
                part.stop()
        if self._sources is not None:
            self._sources.close()
            self._sources = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None

    # -- one round of events ---------------------------------------------------------------
    def handle(self, batch: Batch) -> None:
        for signum in batch.signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s", signal.Signals(signum).name)
                self._stopping = True
        if self._stopping:
            return
        if batch.overflowed:
            for name in sorted(batch.overflowed):
                metrics.EVENT_OVERFLOWS.labels(name).inc()
            log.warning(
                "%s events were lost (socket overflow): rescanning everything",
                ", ".join(sorted(batch.overflowed)),
            )
            self._refresh("overflow")
            if "inotify" in batch.overflowed:
                self.watch_kubelet()
                self._check_config("config directory events lost")
        elif batch.default_route_changed:
            self._refresh("route")  # eligibility of every NIC may have changed
        else:
            self._refresh("link", self._link_targets(batch))
            self._refresh("uevent", self._uevent_targets(batch))
            self._refresh("route", self._route_targets(batch))
        if signal.SIGHUP in batch.signals:
            self.reload("SIGHUP")
        elif any(ev.path == self.config_dir for ev in batch.files):
            self._check_config("config file changed")
        if self.device_plugin and any(ev.path == self.device_plugin_dir for ev in batch.files):
            self.watch_kubelet()
        if self.dra is not None:
            dra_dirs = self.dra.watched_directories()
            if "inotify" in batch.overflowed or any(ev.path in dra_dirs for ev in batch.files):
                self.dra.check_sockets()
            self.dra.publish()

    def _link_targets(self, batch: Batch) -> Set[str]:
        """Apply link events to known devices; the PCI functions that need a re-read."""
        targets: Set[str] = set()
        for ev in batch.links:
            addr = self.inventory.link_event(
                index=ev.index,
                ifname=ev.name,
                admin_up=ev.admin_up,
                carrier=ev.carrier,
                deleted=ev.deleted,
            )
            if addr is not None:
                targets.add(addr)
            elif not ev.deleted and ev.name is not None and not self.inventory.knows_link(ev.index):
                # A link of no device we see here: a netdev of a virtio function not listed
                # yet, or one back from a pod's namespace under a new name. Virtual links
                # (pods' veths) have no PCI function and cost one sysfs lookup.
                owner = self._netdev_function(ev.name)
                if owner is not None:
                    targets.add(owner)
        return targets

    def _uevent_targets(self, batch: Batch) -> Set[str]:
        targets: Set[str] = set()
        for ev in batch.uevents:
            log.debug("uevent %s %s (%s)", ev.action, ev.devpath, ev.subsystem)
            if ev.pci_address is not None:
                targets.add(ev.pci_address)
            if ev.subsystem != "net":
                continue
            name = ev.env.get("INTERFACE")
            index = ev.env.get("IFINDEX")
            targets |= self.inventory.netdev_owners(
                ifname=name, ifindex=int(index) if index and index.isdigit() else None
            )
            if name:
                owner = self._netdev_function(name)
                if owner is not None:
                    targets.add(owner)
        return targets

    def _route_targets(self, batch: Batch) -> Set[str]:
        """The PCI functions whose netdev a (non-default) route was added to or removed from:
        an address the node routes with makes a NIC ineligible (discovery.exclusion). A route
        that only names a NIC's address as its source through another link is left to the
        resync."""
        targets: Set[str] = set()
        for index in sorted(batch.route_links):
            try:
                name = socket.if_indextoname(index)
            except OSError:
                continue  # gone already; its link event says so
            owner = self._netdev_function(name)
            if owner is not None:
                targets.add(owner)
        return targets

    def _netdev_function(self, ifname: str) -> Optional[str]:
        """The PCI function sysfs puts `ifname` under, if any (a virtual link has none)."""
        return sysfs.netdev_pci_address(self.sysfs_root, ifname)

    def _refresh(self, reason: str, addresses: Optional[Set[str]] = None) -> None:
        if addresses is not None and not addresses:
            return
        try:
            self.inventory.refresh(reason, addresses)
        except discovery.DiscoveryError as e:
            self._refresh_failures += 1
            if self._refresh_failures == 1 or self._refresh_failures % 60 == 0:
                log.error("inventory %s failed (keeping the last inventory): %s", reason, e)
            return
        if self._refresh_failures:
            log.info("inventory reads work again")
        self._refresh_failures = 0

    # -- watched directories ---------------------------------------------------------------
    def _directories(self) -> List[str]:
        dirs = [self.config_dir]
        if self.device_plugin:
            dirs.append(self.device_plugin_dir)
        if self.dra is not None:
            dirs.extend(self.dra.watched_directories())
        return [d for d in dirs if d is not None]

    def _all_watched(self) -> bool:
        return self._sources is not None and all(
            self._sources.watching(d) for d in self._directories()
        )

    def _watch_directories(self) -> None:
        assert self._sources is not None
        for d in self._directories():
            if not self._sources.watching(d) and os.path.isdir(d):
                if self._sources.watch_directory(d):
                    # Whatever changed while it was not watched.
                    if d == self.device_plugin_dir:
                        self.watch_kubelet()
                    elif self.dra is not None and d in self.dra.watched_directories():
                        self.dra.check_sockets()
                    else:
                        self._check_config("config directory watched again")

    # -- readiness -------------------------------------------------------------------------
    def ready(self) -> Tuple[bool, str]:
        waiting = sorted(name for name, p in self.plugins.items() if not p.registered)
        if self.dra is not None and not self.dra.registered:
            waiting.append(f"DRA driver {self.dra.driver}")
        if waiting:
            return False, "not registered with the kubelet: " + ", ".join(waiting)
        what = [f"{len(self.plugins)} pools"] if self.device_plugin else []
        if self.dra is not None:
            what.append(f"DRA driver {self.dra.driver}")
        return True, f"ready: {' and '.join(what)} registered"

    # -- kubelet restarts ------------------------------------------------------------------
    def watch_kubelet(self) -> None:
        """Notice a kubelet (re)start: our sockets deleted, or kubelet.sock recreated."""
        current = file_identity(self.kubelet_socket)
        new_kubelet = current is not None and current != self._kubelet_id
        restarted = False
        if new_kubelet:
            if self._last_kubelet_id is not None and current != self._last_kubelet_id:
                restarted = True
                metrics.KUBELET_RESTARTS.inc()
                log.info("kubelet.sock was recreated: the kubelet restarted; registering again")
            else:
                log.info("kubelet.sock appeared at %s", self.kubelet_socket)
            self._last_kubelet_id = current
        self._kubelet_id = current
        if restarted:
            self._refresh("kubelet")  # the new kubelet gets a list read just now
        for plugin in list(self.plugins.values()):
            if not plugin.socket_intact():
                plugin.reserve()
            elif new_kubelet:
                plugin.request_registration()

    # -- config reload ---------------------------------------------------------------------
    def _check_config(self, why: str) -> None:
        """Reload when the config file's content changed (a directory event says it may)."""
        current = _read_bytes(self.config_path)
        if self.config_path is None or current == self._config_bytes:
            return
        self.reload(why)

    def reload(self, why: str) -> bool:
        """Apply the config file again; a bad one is logged and the running config stays."""
        self._config_bytes = _read_bytes(self.config_path)
        try:
            new = pools.load_config(self.config_path)
        except pools.ConfigError as e:
            metrics.CONFIG_RELOADS.labels("rejected").inc()
            log.error("config reload (%s) rejected, keeping the running config: %s", why, e)
            return False
        old = self.inventory.config
        if new.pools == old.pools:
            metrics.CONFIG_RELOADS.labels("unchanged").inc()
            log.info("config reload (%s): no change", why)
            return True
        old_by_name = {p.resource_name: p for p in old.pools}
        new_by_name = {p.resource_name: p for p in new.pools}
        removed = [n for n in old_by_name if n not in new_by_name]
        added = [n for n in new_by_name if n not in old_by_name]
        changed = [n for n in new_by_name if n in old_by_name and new_by_name[n] != old_by_name[n]]
        for name in removed:
            plugin = self.plugins.pop(name, None)
            if plugin is not None:
                plugin.stop()
            metrics.forget_pool(name)
        try:
            self.inventory.set_config(new)
        except discovery.DiscoveryError as e:
            log.error("rescan after reload failed: %s", e)
        for name in added:
            if self._is_device_plugin_pool(name):
                self._add_plugin(name)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.info(
            "config reload (%s) applied from %s: added %s, removed %s, changed %s",
            why,
            new.source,
            added or "none",
            removed or "none",
            changed or "none",
        )
        return True

    def _add_plugin(self, resource_name: str) -> None:
        plugin = PoolPlugin(
            resource_name,
            inventory=self.inventory,
            device_plugin_dir=self.device_plugin_dir,
            devinfo_dir=self.devinfo_dir,
        )
        self.plugins[resource_name] = plugin
        plugin.start()

    def pool_names(self) -> List[str]:
        return sorted(self.plugins)
