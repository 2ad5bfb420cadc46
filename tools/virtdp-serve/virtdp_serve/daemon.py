"""The virtdp-serve daemon: one PoolPlugin per configured pool over one shared Inventory, and
the loops that keep them right.

Threads: the scanner (full inventory scans, every SCAN_INTERVAL and on request), the link
watcher (netlink events), the carrier probe, one registrar per pool, the gRPC servers' workers,
the metrics HTTP server. The main thread runs `run()`: it handles signals and every
WATCH_INTERVAL checks the kubelet's directory (our sockets still there? kubelet.sock
recreated?) and the config file.
All reconfiguration happens on the main thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Tuple

from virtcore import discovery, pools
from virtcore.kubelet import registration
from virtdp_serve import metrics
from virtdp_serve.inventory import Inventory
from virtdp_serve.linkwatch import CarrierProbe, LinkWatcher
from virtdp_serve.plugin import PoolPlugin, file_identity

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1  # kubelet restart noticed within this (+ re-serve and Register)
CONFIG_CHECK_INTERVAL = 1.0
SCAN_INTERVAL = 1.0  # hot-plug/unplug/unbind without a netlink event are seen within this
SCAN_DEBOUNCE = 0.01  # coalesce a burst of link events into one scan


def _file_id(path: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


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
    ) -> None:
        self.config_path = config_path
        self.device_plugin_dir = device_plugin_dir
        self.devinfo_dir = devinfo_dir
        self.kubelet_socket = registration.kubelet_socket(device_plugin_dir)
        self.inventory = Inventory(sysfs_root, config)
        self.plugins: Dict[str, PoolPlugin] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._rescan = threading.Event()
        self._config_id = _file_id(config_path)
        self._kubelet_id = file_identity(self.kubelet_socket)
        self._last_kubelet_id = self._kubelet_id
        self._scan_failures = 0
        self._metrics: Optional[metrics.MetricsServer] = None
        if metrics_address is not None:
            # Bound here, before any plugin socket exists: a bad address fails the start.
            self._metrics = metrics.MetricsServer(metrics_address, self.ready)
        self._links = LinkWatcher(self.inventory, self.request_rescan)
        self._probe = CarrierProbe(self.inventory)
        self._scanner = threading.Thread(target=self._scan_loop, name="scanner", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """First scan, watchers, then every pool's server (each then registers by itself)."""
        self.inventory.rescan("start")
        self._links.start()
        self._probe.start()
        self._scanner.start()
        if self._metrics is not None:
            self._metrics.start()
            log.info("metrics on port %d (/metrics, /healthz, /readyz)", self._metrics.port)
        os.makedirs(self.device_plugin_dir, exist_ok=True)
        for pool in self.inventory.config.pools:
            self._add_plugin(pool.resource_name)
        if self._kubelet_id is None:
            log.info(
                "no kubelet at %s yet; pools will register when it appears", self.kubelet_socket
            )

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""
        self._install_signals()
        next_config_check = time.monotonic() + CONFIG_CHECK_INTERVAL
        try:
            while not self._stop.wait(WATCH_INTERVAL):
                self.watch_kubelet()
                now = time.monotonic()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload("SIGHUP")
                elif now >= next_config_check:
                    next_config_check = now + CONFIG_CHECK_INTERVAL
                    current = _file_id(self.config_path)
                    if current != self._config_id:
                        self._config_id = current
                        self.reload("config file changed")
        finally:
            self.shutdown()
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop the servers, remove our sockets and devinfo files. Idempotent."""
        self._stop.set()
        log.info("stopping: removing sockets and device-info files")
        for plugin in list(self.plugins.values()):
            plugin.stop()
        self._links.stop()
        self._probe.stop()
        self._rescan.set()
        if self._scanner.is_alive():
            self._scanner.join(timeout=2)
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None

    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stop.set()

        def on_hup(signum: int, frame: object) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # -- readiness -------------------------------------------------------------------------
    def ready(self) -> Tuple[bool, str]:
        waiting = sorted(name for name, p in self.plugins.items() if not p.registered)
        if waiting:
            return False, "not registered with the kubelet: " + ", ".join(waiting)
        return True, f"ready: {len(self.plugins)} pools registered"

    # -- kubelet restarts ------------------------------------------------------------------
    def watch_kubelet(self) -> None:
        """Notice a kubelet (re)start: our sockets deleted, or kubelet.sock recreated."""
        current = file_identity(self.kubelet_socket)
        new_kubelet = current is not None and current != self._kubelet_id
        if new_kubelet:
            if self._last_kubelet_id is not None and current != self._last_kubelet_id:
                metrics.KUBELET_RESTARTS.inc()
                log.info("kubelet.sock was recreated: the kubelet restarted; registering again")
            else:
                log.info("kubelet.sock appeared at %s", self.kubelet_socket)
            self._last_kubelet_id = current
        self._kubelet_id = current
        for plugin in list(self.plugins.values()):
            if not plugin.socket_intact():
                plugin.reserve()
            elif new_kubelet:
                plugin.request_registration()

    # -- config reload ---------------------------------------------------------------------
    def reload(self, why: str) -> bool:
        """Apply the config file again; a bad one is logged and the running config stays."""
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

    # -- scanning --------------------------------------------------------------------------
    def request_rescan(self) -> None:
        self._rescan.set()

    def _scan_loop(self) -> None:
        while not self._stop.is_set():
            triggered = self._rescan.wait(SCAN_INTERVAL)
            if self._stop.is_set():
                return
            if triggered:
                time.sleep(SCAN_DEBOUNCE)
            self._rescan.clear()
            try:
                self.inventory.rescan("link-event" if triggered else "periodic")
                if self._scan_failures:
                    log.info("inventory scan works again")
                self._scan_failures = 0
            except discovery.DiscoveryError as e:
                self._scan_failures += 1
                if self._scan_failures == 1 or self._scan_failures % 60 == 0:
                    log.error("inventory scan failed (keeping the last inventory): %s", e)

    def pool_names(self) -> List[str]:
        return sorted(self.plugins)
