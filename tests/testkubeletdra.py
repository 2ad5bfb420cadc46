"""THE test kubelet, DRA side: the plugin watcher, the DRA plugin manager and the DRA manager's
prepare/unprepare, as the real kubelet does them.

Checked against Kubernetes 1.36 (openshift/microshift @ 8e16b12f, deps/github.com/openshift/
kubernetes/pkg/kubelet): `pluginmanager/pluginwatcher/plugin_watcher.go`,
`pluginmanager/operationexecutor/operation_generator.go`, `cm/dra/plugin/dra_plugin_manager.go`,
`cm/dra/plugin/dra_plugin.go`, `cm/dra/manager.go`, `cm/dra/healthinfo.go`:

- watcher: MkdirAll the registry directory, watch it (inotify), and walk it once: every socket
  whose name does not start with '.' is a plugin to register (subdirectories are walked and
  watched too); a removed socket is a plugin to deregister.
- register (GenerateRegisterPluginFunc): dial the socket (blocking, 10 s), GetInfo (1 s
  deadline); no handler for the type -> NotifyRegistrationStatus(false, why); empty endpoint ->
  the socket itself; ValidatePlugin: the first of the plugin's supported versions that the
  kubelet supports ("v1.DRAPlugin", "v1beta1.DRAPlugin"), none -> notify false; RegisterPlugin:
  the same endpoint registered already for the driver -> notify false; else a connection to the
  endpoint and, with ResourceHealthStatus, a NodeWatchResources stream (started again 5 s
  after it ends); then NotifyRegistrationStatus(true, "") (5 s), whose failure deregisters.
- prepare (prepareResources): per claim of the pod: the claim must reserve the pod
  (status.reservedFor); the drivers are those of its allocation results, each must be
  registered; claims already prepared are skipped (and get the pod added); the rest go in one
  NodePrepareResources call per driver (45 s). An RPC error, a per-claim error, an answer for a
  claim not asked for, or a claim left out fails the pod's preparation; claims are marked
  prepared only after every driver answered.
- unprepare (unprepareResources): a claim still used by another pod only loses this pod;
  the others go in one NodeUnprepareResources call per driver; then they leave the cache.
- health (HandleWatchResourcesStream + healthInfoCache): each message replaces the driver's
  device health (last update = arrival); a device not updated within its timeout (default 30 s)
  is Unknown; the cache of a driver is cleared when its stream ends.
- ResourceSlices (with `api` and `node`): at start the kubelet deletes every slice of its node
  (NewDRAPluginManager -> wipeResourceSlices, all drivers); when the last plugin of a driver is
  gone it deletes that driver's slices of the node after `wipe_delay` (30 s, defaultWipingDelay),
  unless a plugin of the driver registers again first.
- restart: plugins and streams are dropped; prepared claims survive (the kubelet checkpoints
  them in dra_manager_state); the new watcher walks the directory again.

Runs in the test process (threads); the plugin under test is another process.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import grpc

from virtcore import inotify
from virtcore.kubelet import (
    dra_pb2,
    dra_pb2_grpc,
    dra_v1beta1_pb2,
    dra_v1beta1_pb2_grpc,
    drahealth_pb2,
    drahealth_pb2_grpc,
    pluginregistration_pb2,
    pluginregistration_pb2_grpc,
)

DRA_PLUGIN = "DRAPlugin"
SERVICES_SUPPORTED = ("v1.DRAPlugin", "v1beta1.DRAPlugin")  # newest first
DIAL_TIMEOUT = 10.0
GET_INFO_TIMEOUT = 1.0
NOTIFY_TIMEOUT = 5.0
CALL_TIMEOUT = 45.0  # defaultClientCallTimeout
HEALTH_RETRY = 5.0
DEFAULT_HEALTH_TIMEOUT = 30.0
WIPE_DELAY = 30.0  # defaultWipingDelay

Obj = Dict[str, Any]


class DraError(Exception):
    """What the kubelet would report for the pod (an event, the pod stays ContainerCreating)."""


@dataclass
class Registration:
    """One GetInfo -> NotifyRegistrationStatus round, as seen by the kubelet."""

    socket: str
    info: Optional[pluginregistration_pb2.PluginInfo]
    registered: bool
    error: str
    at: float


@dataclass
class Plugin:
    driver: str
    endpoint: str
    service: str  # the chosen "v1.DRAPlugin" / "v1beta1.DRAPlugin"
    socket: str  # the registration socket it came from
    channel: grpc.Channel
    registered_at: float
    stop: threading.Event = field(default_factory=threading.Event)
    stream: Optional[Any] = None


@dataclass
class DeviceHealth:
    health: str  # "Healthy", "Unhealthy", "Unknown"
    message: str
    timeout: float
    updated: float


@dataclass
class ClaimInfo:
    namespace: str
    name: str
    uid: str
    drivers: Tuple[str, ...]
    pods: Set[str] = field(default_factory=set)
    prepared: bool = False
    devices: Dict[str, List[dra_pb2.Device]] = field(default_factory=dict)  # per driver


def claim_drivers(claim: Obj) -> Tuple[str, ...]:
    results = (((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get(
        "results"
    ) or []
    return tuple(sorted({r["driver"] for r in results}))


def reserves(claim: Obj, pod_uid: str) -> bool:
    """resourceclaim.IsReservedForPod."""
    for r in (claim.get("status") or {}).get("reservedFor") or []:
        if r.get("resource") == "pods" and not r.get("apiGroup") and r.get("uid") == pod_uid:
            return True
    return False


class TestDraKubelet:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        registry_dir: str,
        *,
        health: bool = True,
        services: Sequence[str] = SERVICES_SUPPORTED,
        api: Optional[Any] = None,
        node: Optional[str] = None,
        wipe_delay: float = WIPE_DELAY,
    ) -> None:
        self.registry_dir = registry_dir
        self.api = api  # a TestApiServer: the kubelet's own client to it
        self.node = node
        self.wipe_delay = wipe_delay
        self.wipes: List[Tuple[Optional[str], int]] = []  # (driver or None for all, deleted)
        self._wipe_timers: Dict[str, threading.Timer] = {}
        self.services = tuple(services)  # what this kubelet version supports
        self.health_enabled = health  # the ResourceHealthStatus feature gate
        self.lock = threading.Condition()
        self.plugins: Dict[str, List[Plugin]] = {}  # driver -> plugins, oldest first
        self.registrations: List[Registration] = []
        self.claims: Dict[Tuple[str, str], ClaimInfo] = {}  # (namespace, name)
        self.health: Dict[str, Dict[Tuple[str, str], DeviceHealth]] = {}
        self.health_messages: List[Tuple[str, float, int]] = []  # (driver, at, devices)
        self.calls: List[Tuple[str, str, List[str]]] = []  # (driver, method, claim uids)
        self.generation = 0
        self._inotify: Optional[inotify.Inotify] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sockets: Dict[str, float] = {}  # registered socket -> when

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.generation += 1
        self._stop = threading.Event()
        os.makedirs(self.registry_dir, mode=0o755, exist_ok=True)
        self.wipe_slices(None)  # no driver is usable before it registers again
        self._inotify = inotify.Inotify()
        self._thread = threading.Thread(
            target=self._watch, args=(self._inotify, self._stop), name="dra watcher", daemon=True
        )
        self._walk(self._inotify, self.registry_dir)
        self._thread.start()

    def stop(self) -> None:
        """The kubelet process ends: watcher, connections and streams go; claims stay."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        with self.lock:
            plugins = [p for ps in self.plugins.values() for p in ps]
            self.plugins.clear()
            self._sockets.clear()
            self.health.clear()
            timers = list(self._wipe_timers.values())
            self._wipe_timers.clear()
        for t in timers:
            t.cancel()
        for p in plugins:
            p.stop.set()
            p.channel.close()

    def restart(self) -> float:
        self.stop()
        at = time.monotonic()
        self.start()
        return at

    # -- plugin watcher --------------------------------------------------------------------
    def _walk(self, ino: inotify.Inotify, directory: str) -> None:
        ino.watch(directory)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                self._walk(ino, path)
            elif stat.S_ISSOCK(st.st_mode) and not name.startswith("."):
                self._register(path)

    def _watch(self, ino: inotify.Inotify, stop: threading.Event) -> None:
        import select

        while not stop.is_set():
            ready, _, _ = select.select([ino.fileno()], [], [], 0.1)
            if not ready or stop.is_set():
                continue
            for ev in ino.read():
                if ev.path is None or not ev.name or ev.name.startswith("."):
                    continue
                path = os.path.join(ev.path, ev.name)
                if ev.mask & inotify.IN_CREATE:
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        self._walk(ino, path)
                    elif stat.S_ISSOCK(st.st_mode):
                        self._register(path)
                elif ev.mask & inotify.IN_DELETE:
                    self._deregister(path)

    def _register(self, socket_path: str) -> None:
        rec = Registration(socket_path, None, False, "", time.monotonic())
        try:
            channel = grpc.insecure_channel("unix://" + socket_path)
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
        except grpc.FutureTimeoutError:
            rec.error = f"dial failed at socket {socket_path}"
            self._record(rec)
            return
        try:
            stub = pluginregistration_pb2_grpc.RegistrationStub(channel)
            try:
                info = stub.GetInfo(pluginregistration_pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT)
            except grpc.RpcError as e:
                rec.error = f"GetInfo failed: {e.code().name}: {e.details()}"
                self._record(rec)
                return
            rec.info = info
            if info.type != DRA_PLUGIN:
                rec.error = f"no handler registered for plugin type: {info.type}"
                self._notify(stub, False, rec.error)
                self._record(rec)
                return
            endpoint = info.endpoint or socket_path
            service = next((s for s in info.supported_versions if s in self.services), None)
            if service is None:
                rec.error = (
                    f"none of services supported by the plugin ({list(info.supported_versions)}) "
                    f"are supported by the kubelet ({list(self.services)})"
                )
                self._notify(stub, False, "plugin validation failed with err: " + rec.error)
                self._record(rec)
                return
            with self.lock:
                clash = any(p.endpoint == endpoint for p in self.plugins.get(info.name, []))
            if clash:
                rec.error = f"endpoint {endpoint} already registered for DRA driver plugin"
                self._notify(stub, False, "plugin registration failed with err: " + rec.error)
                self._record(rec)
                return
            plugin = Plugin(
                driver=info.name,
                endpoint=endpoint,
                service=service,
                socket=socket_path,
                channel=grpc.insecure_channel("unix://" + endpoint),
                registered_at=time.monotonic(),
            )
            with self.lock:
                self.plugins.setdefault(info.name, []).append(plugin)
                self._sockets[socket_path] = plugin.registered_at
                timer = self._wipe_timers.pop(info.name, None)
            if timer is not None:
                timer.cancel()  # usable again: no wiping
            if self.health_enabled:
                threading.Thread(
                    target=self._health_loop, args=(plugin,), name="dra health", daemon=True
                ).start()
            try:
                self._notify(stub, True, "")
            except grpc.RpcError as e:
                self._remove(plugin)
                rec.error = f"failed to send registration status: {e.details()}"
                self._record(rec)
                return
            rec.registered = True
            self._record(rec)
        finally:
            channel.close()

    @staticmethod
    def _notify(stub: Any, registered: bool, error: str) -> None:
        stub.NotifyRegistrationStatus(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=registered, error=error),
            timeout=NOTIFY_TIMEOUT,
        )

    def _record(self, rec: Registration) -> None:
        with self.lock:
            self.registrations.append(rec)
            self.lock.notify_all()

    def _deregister(self, socket_path: str) -> None:
        with self.lock:
            found = [p for ps in self.plugins.values() for p in ps if p.socket == socket_path]
            self._sockets.pop(socket_path, None)
        for p in found:
            self._remove(p)

    def _remove(self, plugin: Plugin) -> None:
        with self.lock:
            plugins = self.plugins.get(plugin.driver, [])
            if plugin in plugins:
                plugins.remove(plugin)
            last = not plugins
            if last:
                self.plugins.pop(plugin.driver, None)
                if plugin.driver not in self._wipe_timers and self.api is not None:
                    timer = threading.Timer(self.wipe_delay, self.wipe_slices, (plugin.driver,))
                    timer.daemon = True
                    self._wipe_timers[plugin.driver] = timer
                    timer.start()
            self.lock.notify_all()
        plugin.stop.set()
        plugin.channel.close()

    def wipe_slices(self, driver: Optional[str]) -> int:
        """DeleteCollection of the node's ResourceSlices (of one driver, or all)."""
        if self.api is None or self.node is None:
            return 0
        deleted = 0
        for s in self.api.list("resourceslices"):
            spec = s.get("spec") or {}
            if spec.get("nodeName") != self.node or (driver and spec.get("driver") != driver):
                continue
            try:
                self.api.delete("resourceslices", s["metadata"]["name"])
                deleted += 1
            except Exception:  # gone meanwhile
                pass
        with self.lock:
            self._wipe_timers.pop(driver or "", None)
            self.wipes.append((driver, deleted))
            self.lock.notify_all()
        return deleted

    def plugin(self, driver: str) -> Plugin:
        """GetPlugin: the newest registered plugin of the driver."""
        with self.lock:
            plugins = self.plugins.get(driver)
            if not plugins:
                raise DraError(f"DRA driver {driver} is not registered")
            return plugins[-1]

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"test kubelet: no {what} within {timeout}s")
                self.lock.wait(min(left, 0.05))

    def wait_registered(self, driver: str, timeout: float = 10) -> Plugin:
        self.wait(lambda: bool(self.plugins.get(driver)), timeout, f"registration of {driver}")
        return self.plugin(driver)

    # -- health ----------------------------------------------------------------------------
    def _health_loop(self, plugin: Plugin) -> None:
        stub = drahealth_pb2_grpc.DRAResourceHealthStub(plugin.channel)
        while not plugin.stop.is_set():
            try:
                stream = stub.NodeWatchResources(drahealth_pb2.NodeWatchResourcesRequest())
                plugin.stream = stream
                for resp in stream:
                    self._health_update(plugin.driver, resp)
            except grpc.RpcError:
                pass
            except ValueError:  # the channel was closed under the stream
                return
            finally:
                with self.lock:
                    self.health.pop(plugin.driver, None)  # clearDriver on stream exit
                    self.lock.notify_all()
            plugin.stop.wait(HEALTH_RETRY)

    def _health_update(self, driver: str, resp: drahealth_pb2.NodeWatchResourcesResponse) -> None:
        now = time.monotonic()
        names = {0: "Unknown", 1: "Healthy", 2: "Unhealthy"}
        with self.lock:
            cache = self.health.setdefault(driver, {})
            for d in resp.devices:
                timeout = d.health_check_timeout_seconds
                cache[(d.device.pool_name, d.device.device_name)] = DeviceHealth(
                    health=names.get(d.health, "Unknown"),
                    message=d.message[:1024],
                    timeout=float(timeout) if timeout > 0 else DEFAULT_HEALTH_TIMEOUT,
                    updated=now,
                )
            self.health_messages.append((driver, now, len(resp.devices)))
            self.lock.notify_all()

    def device_health(self, driver: str, pool: str, device: str) -> str:
        """getHealthInfo: Unknown when never reported or not updated within its timeout."""
        with self.lock:
            h = self.health.get(driver, {}).get((pool, device))
            if h is None or time.monotonic() - h.updated > h.timeout:
                return "Unknown"
            return h.health

    def wait_health(self, driver: str, pool: str, device: str, want: str, timeout: float = 10):
        self.wait(
            lambda: self.device_health(driver, pool, device) == want,
            timeout,
            f"health {want} of {pool}/{device}",
        )
        with self.lock:
            return self.health[driver][(pool, device)]

    # -- prepare / unprepare ---------------------------------------------------------------
    def _stub(self, plugin: Plugin) -> Tuple[Any, Any]:
        if plugin.service == "v1beta1.DRAPlugin":
            return dra_v1beta1_pb2_grpc.DRAPluginStub(plugin.channel), dra_v1beta1_pb2
        return dra_pb2_grpc.DRAPluginStub(plugin.channel), dra_pb2

    def _call(self, driver: str, method: str, batch: List[dra_pb2.Claim]) -> Dict[str, Any]:
        """One Node(Un)PrepareResources call with the kubelet's checks of the answer: an RPC
        error, a claim's error, an answer for a claim not asked for, or a claim left out fails
        it. Returns claim uid -> its answer."""
        stub, pb = self._stub(self.plugin(driver))
        request = getattr(pb, f"{method}Request")(
            claims=[pb.Claim(namespace=c.namespace, uid=c.uid, name=c.name) for c in batch]
        )
        self.calls.append((driver, method, [c.uid for c in batch]))
        try:
            resp = getattr(stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise DraError(f"{method}: {e.code().name}: {e.details()}") from None
        asked = {c.uid: c for c in batch}
        for uid, result in resp.claims.items():
            if uid not in asked:
                raise DraError(f"{method} returned result for unknown claim UID {uid}")
            if result.error:
                raise DraError(
                    f"{method} failed for ResourceClaim {asked[uid].name}: {result.error}"
                )
        if len(resp.claims) != len(batch):
            raise DraError(f"{method} skipped {len(batch) - len(resp.claims)} ResourceClaims")
        return dict(resp.claims)

    def prepare(self, pod_uid: str, claims: Sequence[Obj]) -> Dict[str, List[dra_pb2.Device]]:
        """Before the sandbox: every claim of the pod (the API objects, as the kubelet reads
        them). Returns claim uid -> devices. DraError when the pod cannot start."""
        infos = []
        for claim in claims:
            meta = claim["metadata"]
            if not reserves(claim, pod_uid):
                raise DraError(
                    f"pod ({pod_uid}) is not allowed to use ResourceClaim {meta['name']} "
                    f"({meta['uid']})"
                )
            drivers = claim_drivers(claim)
            for d in drivers:
                self.plugin(d)
            infos.append((claim, drivers))
        batches: Dict[str, List[dra_pb2.Claim]] = {}
        todo: List[ClaimInfo] = []
        with self.lock:
            for claim, drivers in infos:
                meta = claim["metadata"]
                key = (meta["namespace"], meta["name"])
                info = self.claims.get(key)
                if info is None:
                    info = ClaimInfo(meta["namespace"], meta["name"], meta["uid"], drivers)
                    self.claims[key] = info
                elif info.uid != meta["uid"]:
                    raise DraError(
                        f"old ResourceClaim with same name {meta['name']} and different UID "
                        f"{info.uid} still exists (previous pod force-deleted?!)"
                    )
                info.pods.add(pod_uid)
                if info.prepared:
                    continue
                todo.append(info)
                for d in drivers:
                    batches.setdefault(d, []).append(
                        dra_pb2.Claim(namespace=info.namespace, uid=info.uid, name=info.name)
                    )
        for driver, batch in batches.items():
            answers = self._call(driver, "NodePrepareResources", batch)
            for uid, result in answers.items():
                devices = [dra_pb2.Device.FromString(d.SerializeToString()) for d in result.devices]
                ref = next(c for c in batch if c.uid == uid)
                with self.lock:
                    self.claims[(ref.namespace, ref.name)].devices[driver] = devices
        with self.lock:
            for info in todo:
                info.prepared = True
            return {
                c["metadata"]["uid"]: [
                    d
                    for ds in self.claims[
                        (c["metadata"]["namespace"], c["metadata"]["name"])
                    ].devices.values()
                    for d in ds
                ]
                for c in claims
            }

    def unprepare(self, pod_uid: str, namespace: str, claim_names: Sequence[str]) -> None:
        """After the pod's sandbox is gone."""
        batches: Dict[str, List[dra_pb2.Claim]] = {}
        done: List[Tuple[str, str]] = []
        with self.lock:
            for name in claim_names:
                info = self.claims.get((namespace, name))
                if info is None:
                    continue
                if len(info.pods) > 1:
                    info.pods.discard(pod_uid)
                    continue
                done.append((namespace, name))
                for d in info.drivers:
                    batches.setdefault(d, []).append(
                        dra_pb2.Claim(namespace=namespace, uid=info.uid, name=name)
                    )
        for driver, batch in batches.items():
            self._call(driver, "NodeUnprepareResources", batch)
        with self.lock:
            for key in done:
                self.claims.pop(key, None)
