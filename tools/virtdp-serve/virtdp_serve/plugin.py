"""One pool's device plugin: the v1beta1 DevicePlugin servicer, its gRPC server on a unix socket
in the kubelet's directory, and its registration with the kubelet.

A `PoolPlugin` serves first and registers second. When its socket disappears (the kubelet
restarted and cleaned its directory) the daemon calls `reserve()`: a fresh server on a fresh
socket, then Register again. Registration runs in the pool's own thread, retrying with backoff
while the kubelet is absent; `kick()` makes it retry at once (kubelet.sock appeared).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from concurrent import futures
from typing import Dict, Iterator, List, Optional, Set, Tuple

import grpc

from virtcore import devinfo
from virtcore.kubelet import channel, deviceplugin_pb2, deviceplugin_pb2_grpc, registration
from virtdp_serve import allocation, metrics
from virtdp_serve.inventory import Device, Inventory

log = logging.getLogger(__name__)

OPTIONS = deviceplugin_pb2.DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=True
)
# sockaddr_un.sun_path is 108 bytes, with the terminating NUL.
MAX_SOCKET_PATH = 107
WAIT_LOG_INTERVAL = 60.0  # "still waiting for the kubelet" at most this often
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 5.0
STOP_WAIT = 5.0  # at most this long for a stopping server's connections to close
# A stream waits for inventory changes; the kubelet going away or a stop wakes it at once, so
# this is only a backstop, long enough to cost nothing at rest.
STREAM_BACKSTOP = 30.0


class ServeError(RuntimeError):
    """The plugin's socket could not be created or served."""


def socket_name(resource_name: str) -> str:
    """`kernel.org/virt` -> `kernel.org_virt.sock` (a file in the device-plugins directory)."""
    return resource_name.replace("/", "_") + ".sock"


def _device_message(d: Device) -> deviceplugin_pb2.Device:
    msg = deviceplugin_pb2.Device(ID=d.pci_address, health=d.health)
    if d.numa_node is not None:
        msg.topology.nodes.add(ID=d.numa_node)
    return msg


class Servicer(deviceplugin_pb2_grpc.DevicePluginServicer):
    """The DevicePlugin service of one pool, over the shared inventory."""

    def __init__(self, plugin: PoolPlugin) -> None:
        self._plugin = plugin
        self._inventory = plugin.inventory
        self._resource = plugin.resource_name

    def _views(self) -> Tuple[Dict[str, allocation.DeviceView], Dict[str, str]]:
        views = {
            d.pci_address: allocation.DeviceView(d.pci_address, d.healthy, d.numa_node)
            for d in self._inventory.pool_devices(self._resource)
        }
        return views, self._inventory.owners()

    def GetDevicePluginOptions(self, request, context):  # noqa: N802 (gRPC names)
        return OPTIONS

    def ListAndWatch(
        self, request, context
    ) -> Iterator[deviceplugin_pb2.ListAndWatchResponse]:  # noqa: N802
        stopped = self._plugin.stopped_event
        inv = self._inventory
        context.add_callback(inv.wake)  # the kubelet went away: stop waiting
        last: Optional[List[Tuple[str, str, Optional[int]]]] = None
        log.info("%s: kubelet opened ListAndWatch", self._resource)
        while context.is_active() and not stopped.is_set():
            version = inv.version  # read before the list: a change after it ends the wait
            devices = inv.pool_devices(self._resource)
            state = [(d.pci_address, d.health, d.numa_node) for d in devices]
            if state != last:
                last = state
                metrics.LIST_AND_WATCH_UPDATES.labels(self._resource).inc()
                healthy = sum(1 for d in devices if d.healthy)
                log.debug(
                    "%s: sending %d devices (%d healthy)", self._resource, len(devices), healthy
                )
                yield deviceplugin_pb2.ListAndWatchResponse(
                    devices=[_device_message(d) for d in devices]
                )
            inv.wait_for_change(version, timeout=STREAM_BACKSTOP)
        log.debug("%s: ListAndWatch ended", self._resource)

    def GetPreferredAllocation(self, request, context):  # noqa: N802
        views, owners = self._views()
        response = deviceplugin_pb2.PreferredAllocationResponse()
        if not request.container_requests:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "PreferredAllocationRequest has no container_requests, expected one per container",
            )
        for i, req in enumerate(request.container_requests):
            what = f"container_requests[{i}]"
            try:
                ids, ignored = allocation.preferred(
                    list(req.available_deviceIDs),
                    list(req.must_include_deviceIDs),
                    req.allocation_size,
                    self._resource,
                    views,
                    owners,
                    what=what,
                )
            except allocation.AllocationError as e:
                log.warning("%s: GetPreferredAllocation refused: %s", self._resource, e.message)
                context.abort(e.code, e.message)
            if ignored:
                # The kubelet fails the pod's admission on any error here; its list may be a
                # moment behind ours. Answer from what is ours; Allocate checks again.
                metrics.PREFERRED_IGNORED_IDS.labels(self._resource).inc(len(ignored))
                log.warning(
                    "%s: GetPreferredAllocation %s: ignored %s (not devices of this pool now)",
                    self._resource,
                    what,
                    ", ".join(ignored),
                )
            response.container_responses.add(deviceIDs=ids)
        return response

    def Allocate(self, request, context):  # noqa: N802
        started = time.perf_counter()
        try:
            views, owners = self._views()
            try:
                groups = allocation.check_allocate(
                    [list(r.devices_ids) for r in request.container_requests],
                    self._resource,
                    views,
                    owners,
                )
            except allocation.AllocationError as e:
                metrics.ALLOCATIONS.labels(self._resource, e.code.name.lower()).inc(
                    max(1, len(request.container_requests))
                )
                log.warning("%s: Allocate refused: %s", self._resource, e.message)
                context.abort(e.code, e.message)
            response = deviceplugin_pb2.AllocateResponse()
            env = allocation.env_name(self._resource)
            for ids in groups:
                for dev_id in ids:
                    try:
                        self._plugin.write_devinfo(dev_id)
                    except OSError as e:
                        metrics.ALLOCATIONS.labels(self._resource, "internal").inc()
                        msg = f"cannot write the device-info file of {dev_id}: {e}"
                        log.error("%s: Allocate failed: %s", self._resource, msg)
                        context.abort(grpc.StatusCode.INTERNAL, msg)
                response.container_responses.add(envs={env: ",".join(ids)})
                metrics.ALLOCATIONS.labels(self._resource, "ok").inc()
                metrics.ALLOCATED_DEVICES.labels(self._resource).inc(len(ids))
                log.info("%s: allocated %s", self._resource, ",".join(ids))
            return response
        finally:
            metrics.ALLOCATE_SECONDS.labels(self._resource).observe(time.perf_counter() - started)

    def PreStartContainer(self, request, context):  # noqa: N802
        return deviceplugin_pb2.PreStartContainerResponse()


class PoolPlugin:
    """Serving and registration of one pool. Thread-safe; `stop()` is idempotent."""

    def __init__(
        self,
        resource_name: str,
        *,
        inventory: Inventory,
        device_plugin_dir: str,
        devinfo_dir: str,
    ) -> None:
        self.resource_name = resource_name
        self.inventory = inventory
        self.device_plugin_dir = device_plugin_dir
        self.devinfo_dir = devinfo_dir
        self.socket_path = os.path.join(device_plugin_dir, socket_name(resource_name))
        if len(self.socket_path.encode()) > MAX_SOCKET_PATH:
            raise ServeError(
                f"{self.socket_path}: socket path is {len(self.socket_path.encode())} bytes, "
                f"expected at most {MAX_SOCKET_PATH} (use a shorter --device-plugin-dir)"
            )
        self.kubelet_socket = registration.kubelet_socket(device_plugin_dir)
        self._lock = threading.RLock()
        self._server: Optional[grpc.Server] = None
        self._inode: Optional[Tuple[int, int, int]] = None
        self.stopped_event = threading.Event()  # the current server's streams must end
        self._devinfo: Set[str] = set()
        self._registered = False
        self._need_register = threading.Event()
        self._kick = threading.Event()
        self._shutdown = threading.Event()
        self._generation = 0  # bumped per (re)serve: a registration of an old server is void
        self._registrar = threading.Thread(
            target=self._register_loop, name=f"register {resource_name}", daemon=True
        )
        metrics.POOL_REGISTERED.labels(resource_name).set(0)

    # -- serving ---------------------------------------------------------------------------
    def start(self) -> None:
        """Serve, then register in the background."""
        self._serve()
        self._registrar.start()

    def _serve(self) -> None:
        with self._lock:
            self._stop_server()
            remove_stale_socket(self.socket_path)
            server = grpc.server(
                futures.ThreadPoolExecutor(
                    max_workers=8, thread_name_prefix=f"grpc {self.resource_name}"
                ),
                options=[("grpc.so_reuseport", 0)],
            )
            deviceplugin_pb2_grpc.add_DevicePluginServicer_to_server(Servicer(self), server)
            try:
                port = server.add_insecure_port("unix://" + os.path.abspath(self.socket_path))
            except RuntimeError as e:
                raise ServeError(f"{self.socket_path}: cannot listen: {e}") from None
            if port == 0:
                raise ServeError(f"{self.socket_path}: cannot listen (gRPC refused the address)")
            self.stopped_event = threading.Event()
            server.start()
            self._server = server
            self._inode = file_identity(self.socket_path)
            self._generation += 1
            self._set_registered(False)
            log.info("%s: serving on %s", self.resource_name, self.socket_path)
            self._need_register.set()
            self._kick.set()

    def reserve(self) -> None:
        """The socket is gone (kubelet restart): a fresh server on a fresh socket, re-register."""
        log.info("%s: socket %s is gone; serving again", self.resource_name, self.socket_path)
        self._serve()

    def socket_intact(self) -> bool:
        current = file_identity(self.socket_path)
        with self._lock:
            return current is not None and self._inode == current

    def _stop_server(self) -> None:
        # Called with self._lock held.
        if self._server is None:
            return
        self.stopped_event.set()
        self.inventory.wake()
        # Wait until the old connections are closed: a kubelet that sees the old ListAndWatch
        # end after our next Register stops the *new* endpoint (PluginDisconnected works by
        # resource name) and, before 1.3x, closes its connection too.
        if not self._server.stop(grace=None).wait(STOP_WAIT):
            log.warning("%s: old server still stopping after %ss", self.resource_name, STOP_WAIT)
        self._server = None
        if self.socket_intact():
            unlink_quietly(self.socket_path)
        self._inode = None

    def stop(self, *, remove_devinfo: bool = True) -> None:
        """Stop serving, remove the socket (if still ours) and, by default, our devinfo files."""
        self._shutdown.set()
        self._kick.set()
        self._need_register.set()
        with self._lock:
            self._stop_server()
            self._set_registered(False)
            if remove_devinfo:
                for path in sorted(self._devinfo):
                    devinfo.remove_path(path)
                self._devinfo.clear()
        if self._registrar.is_alive():
            self._registrar.join(timeout=2)

    # -- device-info files -----------------------------------------------------------------
    def write_devinfo(self, pci_address: str) -> str:
        path = devinfo.write(self.devinfo_dir, self.resource_name, pci_address)
        with self._lock:
            self._devinfo.add(path)
        return path

    # -- registration ----------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self._registered

    def _set_registered(self, value: bool) -> None:
        self._registered = value
        metrics.POOL_REGISTERED.labels(self.resource_name).set(1 if value else 0)

    def request_registration(self) -> None:
        """Register again (a new kubelet appeared) with the current server."""
        self._set_registered(False)
        self._need_register.set()
        self._kick.set()

    def kick(self) -> None:
        """Retry a pending registration now instead of after the backoff."""
        self._kick.set()

    def _register_loop(self) -> None:
        backoff = BACKOFF_FIRST
        waiting_since: Optional[float] = None
        last_wait_log = 0.0
        while not self._shutdown.is_set():
            self._need_register.wait()
            if self._shutdown.is_set():
                return
            self._kick.clear()
            with self._lock:
                generation = self._generation
                serving = self._server is not None
            if not serving:
                self._need_register.clear()
                continue
            try:
                registration.register(
                    self.kubelet_socket,
                    endpoint=os.path.basename(self.socket_path),
                    resource_name=self.resource_name,
                    options=OPTIONS,
                )
            except (channel.SocketUnavailable, registration.RegistrationError) as e:
                unavailable = isinstance(e, channel.SocketUnavailable)
                metrics.REGISTRATIONS.labels(
                    self.resource_name, "unavailable" if unavailable else "refused"
                ).inc()
                now = time.monotonic()
                if waiting_since is None:
                    waiting_since = last_wait_log = now
                    log.warning(
                        "%s: cannot register with the kubelet yet (%s); retrying with backoff",
                        self.resource_name,
                        e,
                    )
                elif now - last_wait_log >= WAIT_LOG_INTERVAL:
                    last_wait_log = now
                    log.warning(
                        "%s: still waiting for the kubelet after %.0fs (%s)",
                        self.resource_name,
                        now - waiting_since,
                        e,
                    )
                else:
                    log.debug("%s: register failed: %s", self.resource_name, e)
                self._kick.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            metrics.REGISTRATIONS.labels(self.resource_name, "ok").inc()
            with self._lock:
                current = generation == self._generation and self._server is not None
                if current:
                    self._need_register.clear()
                    self._set_registered(True)
            if current:
                waited = (
                    f" after waiting {time.monotonic() - waiting_since:.1f}s"
                    if waiting_since
                    else ""
                )
                log.info(
                    "%s: registered with the kubelet as %s%s",
                    self.resource_name,
                    os.path.basename(self.socket_path),
                    waited,
                )
            waiting_since = None
            backoff = BACKOFF_FIRST


def file_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """Device, inode and change time: a deleted and recreated file differs even when the
    filesystem hands out the same inode number again."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_socket(path: str) -> None:
    """Remove a leftover socket at `path`; anything else there is an error, not ours to delete."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path}: exists and is not a socket; refusing to replace it")
    log.info("removing stale socket %s", path)
    unlink_quietly(path)
