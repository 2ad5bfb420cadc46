"""The DRA kubelet plugin: registration with the kubelet's plugin watcher, the DRA v1 (and
v1beta1) service that prepares ResourceClaims, and the dra-health stream.

Sockets (the kubelet's layout; both are unix sockets the kubelet dials):
- `<plugins_registry>/<driver>-reg.sock`: pluginregistration v1 `Registration`. The kubelet's
  plugin watcher finds it (inotify, and a walk when the kubelet starts), calls GetInfo, checks
  the type (DRAPlugin) and the services, creates its connection to the endpoint, then calls
  NotifyRegistrationStatus. Removing the socket deregisters the plugin.
- `<plugins>/<driver>/dra.sock`, the endpoint: `v1.DRAPlugin`, `v1beta1.DRAPlugin` and
  `v1alpha1.DRAResourceHealth`. It is served before the registration socket appears (serve
  first, register second): the kubelet may call it at once.

Either socket gone (a wiped directory): serve it again; a new endpoint also gets a new
registration socket, so the kubelet dials it anew. A kubelet restart needs nothing: the new
kubelet walks the registry directory and registers the plugin again.

NodePrepareResources reads each claim from the API server (concurrently, within one deadline),
checks it (`prepare.prepare`), records it in the node-local claim record
(`virtcore.claims`, atomic, survives restarts of the daemon and the kubelet) and answers its
devices. A claim that cannot be prepared gets a per-claim error that says why; the call itself
fails only when the request cannot be read (a claim without uid) or the record cannot be
written, since then nothing was prepared. Preparing a recorded claim again answers the same
devices (the kubelet repeats calls after restarts). NodeUnprepareResources forgets the claim.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc

from virtcore import claims
from virtcore.claims import PreparedClaim
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
from virtdp_serve import metrics, prepare
from virtdp_serve.inventory import NO_CARRIER, NO_NETDEV, DraDevice, Inventory, dra_device
from virtdp_serve.plugin import (
    MAX_SOCKET_PATH,
    STOP_WAIT,
    ServeError,
    file_identity,
    remove_stale_socket,
    unlink_quietly,
)
from virtdp_serve.prepare import ClaimError, ClaimRef, base_request

log = logging.getLogger(__name__)

DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DEFAULT_PLUGINS_DIR = "/var/lib/kubelet/plugins"
PLUGIN_TYPE = "DRAPlugin"
# Newest first: the kubelet picks the first it supports (v1 from 1.34, v1beta1 in 1.32-1.33).
SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
DRA_SOCKET = "dra.sock"
# Every NodePrepareResources call reads its claims within this many seconds (the kubelet's own
# deadline is 45 s).
DEFAULT_API_TIMEOUT = 10.0
# The kubelet turns a device's health Unknown when no update came for this long: health is sent
# on every change, and the whole list again at half this period so that it never goes stale.
HEALTH_TIMEOUT = 3600
HEALTH_RESEND = HEALTH_TIMEOUT / 2
_MESSAGES = {
    NO_CARRIER: "no carrier on the NIC's link",
    NO_NETDEV: "the NIC has no netdev in the node's network namespace",
}


class ReadError(Exception):
    """A claim could not be read from the API server; the message says why."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


# (namespace, name, timeout in seconds) -> the ResourceClaim as decoded JSON.
ClaimReader = Callable[[str, str, float], Any]

_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")


def _transport_problem(message: str) -> str:
    """The useful part of urllib3's wrapped message ("[Errno 111] Connection refused")."""
    m = _ERRNO.search(message)
    return m.group(0) if m else message[:200]


def kube_reader(kube: Any) -> ClaimReader:
    """Claims read with the `kubernetes` client of a `virtcore.kubeapi.Kube`. The JSON is
    decoded here, not into the client's models: `prepare` checks it field by field anyway."""
    from virtcore import kubeapi

    api = kube.resource()

    def read(namespace: str, name: str, timeout: float) -> Any:
        try:
            resp = api.read_namespaced_resource_claim(
                name,
                namespace,
                _preload_content=False,
                _request_timeout=(min(kube.timeout[0], timeout), timeout),
            )
            return json.loads(resp.data)
        except Exception as e:
            failure = kubeapi.failure(e)
            if failure is None:
                if isinstance(e, ValueError):
                    raise ReadError(f"the API server's answer is not JSON: {e}") from None
                raise
            if failure.status == 404:
                raise ReadError("not found in the API server (deleted?)") from None
            if failure.unreachable:
                if "timed out" in failure.message:
                    raise ReadError("the API server did not answer", timed_out=True) from None
                raise ReadError(
                    f"API server unreachable: {_transport_problem(failure.message)}"
                ) from None
            raise ReadError(f"the API server refused to read it: {failure}") from None

    return read


def _claim_ref(c: Any) -> ClaimRef:
    return ClaimRef(namespace=c.namespace, name=c.name, uid=c.uid)


def _devices(claim: PreparedClaim) -> List[dra_pb2.Device]:
    return [
        dra_pb2.Device(
            request_names=[base_request(d.request)], pool_name=d.pool, device_name=d.device
        )
        for d in claim.devices
    ]


class DraPlugin:
    """The DRA side of the daemon. Thread-safe; `stop()` is idempotent."""

    def __init__(
        self,
        *,
        driver: str,
        node: str,
        registry_dir: str,
        plugins_dir: str,
        state_dir: str,
        inventory: Inventory,
        pools: Callable[[], Iterable[str]],
        reader: ClaimReader,
        api_timeout: float = DEFAULT_API_TIMEOUT,
        on_devices: Optional[Callable[[Sequence[DraDevice]], None]] = None,
        on_claims: Optional[Callable[[Sequence[ClaimRef]], None]] = None,
    ) -> None:
        self.driver = driver
        self.node = node
        self.registry_dir = registry_dir
        self.endpoint_dir = os.path.join(plugins_dir, driver)
        self.state_dir = state_dir
        self.inventory = inventory
        self.pools = pools
        self.reader = reader
        self.api_timeout = api_timeout
        self.on_devices = on_devices
        self.on_claims = on_claims
        self.registration_socket = os.path.join(registry_dir, f"{driver}-reg.sock")
        self.endpoint = os.path.join(self.endpoint_dir, DRA_SOCKET)
        for path in (self.registration_socket, self.endpoint):
            if len(path.encode()) > MAX_SOCKET_PATH:
                raise ServeError(
                    f"{path}: socket path is {len(path.encode())} bytes, expected at most "
                    f"{MAX_SOCKET_PATH} (use shorter kubelet directories)"
                )
        self._lock = threading.RLock()  # servers and sockets
        self._record_lock = threading.Lock()  # the claim record
        self._claims: Dict[str, PreparedClaim] = {}
        self._servers: Dict[str, grpc.Server] = {}
        self._identity: Dict[str, Optional[Tuple[int, int, int]]] = {}
        self._registered = False
        self._published: Optional[Tuple[DraDevice, ...]] = None
        self._publish_lock = threading.Lock()
        self.stopped_event = threading.Event()
        self._set_registered(False)

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Read the claim record (before serving). A malformed one is ClaimRecordError: it is
        never overwritten, the claims in it may be in use."""
        record = claims.load(self.state_dir)
        foreign = sorted({c.driver for c in record.values()} - {self.driver})
        if foreign:
            raise claims.ClaimRecordError(
                claims.claims_path(self.state_dir),
                "driver",
                f"{', '.join(foreign)}, but --dra-driver is {self.driver} (another driver's "
                "state directory? give each driver its own --dra-state-dir)",
            )
        with self._record_lock:
            self._claims = record
        metrics.DRA_CLAIMS.set(len(record))
        if record:
            log.info("DRA: %d prepared claims in %s", len(record), self.state_dir)

    def start(self) -> None:
        """Serve the endpoint, then the registration socket."""
        self.load()
        os.makedirs(self.endpoint_dir, exist_ok=True)
        os.makedirs(self.registry_dir, exist_ok=True)
        self._serve("endpoint")
        self._serve("registration")
        self.publish()

    def stop(self) -> None:
        """Stop serving and remove both sockets (if still ours); the record stays."""
        with self._lock:
            for which in ("registration", "endpoint"):
                self._stop_server(which)
            self._set_registered(False)

    def check_sockets(self) -> None:
        """A directory changed: serve again whatever socket is gone."""
        with self._lock:
            if not self._servers:
                return
            if not self._intact("endpoint"):
                log.info("DRA: endpoint %s is gone; serving again", self.endpoint)
                os.makedirs(self.endpoint_dir, exist_ok=True)
                self._serve("endpoint")
                self._serve("registration")  # the kubelet must dial the new endpoint
            elif not self._intact("registration"):
                log.info(
                    "DRA: registration socket %s is gone; serving again", self.registration_socket
                )
                os.makedirs(self.registry_dir, exist_ok=True)
                self._serve("registration")

    def watched_directories(self) -> List[str]:
        return [self.registry_dir, self.endpoint_dir]

    def _path(self, which: str) -> str:
        return self.endpoint if which == "endpoint" else self.registration_socket

    def _intact(self, which: str) -> bool:
        current = file_identity(self._path(which))
        return current is not None and current == self._identity.get(which)

    def _serve(self, which: str) -> None:
        with self._lock:
            self._stop_server(which)
            path = self._path(which)
            remove_stale_socket(path)
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"dra {which}"),
                options=[("grpc.so_reuseport", 0)],
            )
            if which == "endpoint":
                self.stopped_event = threading.Event()
                dra_pb2_grpc.add_DRAPluginServicer_to_server(PrepareServicer(self), server)
                dra_v1beta1_pb2_grpc.add_DRAPluginServicer_to_server(
                    PrepareServicerV1beta1(self), server
                )
                drahealth_pb2_grpc.add_DRAResourceHealthServicer_to_server(
                    HealthServicer(self), server
                )
            else:
                self._set_registered(False)
                pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(
                    RegistrationServicer(self), server
                )
            try:
                port = server.add_insecure_port("unix://" + os.path.abspath(path))
            except RuntimeError as e:
                raise ServeError(f"{path}: cannot listen: {e}") from None
            if port == 0:
                raise ServeError(f"{path}: cannot listen (gRPC refused the address)")
            server.start()
            self._servers[which] = server
            self._identity[which] = file_identity(path)
            log.info("DRA: serving %s on %s", which, path)

    def _stop_server(self, which: str) -> None:
        server = self._servers.pop(which, None)
        if server is None:
            return
        if which == "endpoint":
            self.stopped_event.set()
            self.inventory.wake()  # health streams end
        if not server.stop(grace=None).wait(STOP_WAIT):
            log.warning("DRA: %s server still stopping after %ss", which, STOP_WAIT)
        if self._intact(which):
            unlink_quietly(self._path(which))
        self._identity.pop(which, None)

    # -- registration ----------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self._registered

    def _set_registered(self, value: bool) -> None:
        self._registered = value
        metrics.DRA_REGISTERED.set(1 if value else 0)

    def plugin_info(self) -> pluginregistration_pb2.PluginInfo:
        return pluginregistration_pb2.PluginInfo(
            type=PLUGIN_TYPE, name=self.driver, endpoint=self.endpoint, supported_versions=SERVICES
        )

    def registration_status(self, registered: bool, error: str) -> None:
        if registered:
            if not self._registered:
                log.info("DRA: registered with the kubelet as driver %s", self.driver)
            self._set_registered(True)
        else:
            self._set_registered(False)
            log.error("DRA: the kubelet refused the registration of %s: %s", self.driver, error)

    # -- devices ---------------------------------------------------------------------------
    def devices(self) -> Tuple[DraDevice, ...]:
        """Every NIC this driver offers now, sorted by PCI address."""
        with self._record_lock:
            held = {d.pci_address for c in self._claims.values() for d in c.devices}
        return tuple(
            dra_device(d, held=d.pci_address in held) for d in self.inventory.devices(self.pools())
        )

    def publish(self) -> None:
        """Hand the device list to `on_devices` when it changed (the event loop calls this after
        every inventory change; a claim record change calls it too)."""
        with self._publish_lock:
            devices = self.devices()
            if devices == self._published:
                return
            self._published = devices
            if self.on_devices is not None:
                try:
                    self.on_devices(devices)
                except Exception:  # the publisher's bug must not stop the daemon
                    log.exception("DRA: handing the device list to the slice publisher failed")

    def prepared(self) -> Dict[str, PreparedClaim]:
        with self._record_lock:
            return dict(self._claims)

    # -- NodePrepareResources / NodeUnprepareResources -------------------------------------
    def node_prepare(self, requested: Sequence[ClaimRef]) -> Dict[str, Tuple[List[Any], str]]:
        """claim uid -> (devices, error) for every claim asked for. Raises RecordError when the
        record cannot be written (nothing was prepared)."""
        started = time.perf_counter()
        try:
            docs = self._read_all(requested)
            offered = {d.name: d.pci_address for d in self.devices()}
            out: Dict[str, Tuple[List[Any], str]] = {}
            with self._record_lock:
                record = dict(self._claims)
                for ref in requested:
                    try:
                        claim = self._prepare_one(ref, docs[ref.uid], record, offered)
                    except ClaimError as e:
                        log.warning("DRA: cannot prepare: %s", e)
                        out[ref.uid] = ([], str(e))
                        metrics.DRA_CLAIM_RESULTS.labels("prepare", "error").inc()
                        continue
                    record[claim.uid] = claim
                    out[ref.uid] = (_devices(claim), "")
                changed = [r for r in requested if record.get(r.uid) != self._claims.get(r.uid)]
                if changed:
                    self._save(record)
                for ref in requested:
                    if not out[ref.uid][1]:
                        metrics.DRA_CLAIM_RESULTS.labels("prepare", "ok").inc()
            self.after_record_change(changed)
            return out
        finally:
            metrics.DRA_PREPARE_SECONDS.observe(time.perf_counter() - started)

    def _read_all(self, requested: Sequence[ClaimRef]) -> Dict[str, Any]:
        """uid -> the claim's JSON, or the ReadError that says why it could not be read. All
        reads share one deadline and run at the same time."""
        deadline = time.monotonic() + self.api_timeout

        def read(ref: ClaimRef) -> Any:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise ReadError("not read", timed_out=True)
                return self.reader(ref.namespace, ref.name, remaining)
            except ReadError as e:
                if e.timed_out:
                    return ReadError(
                        f"{e} within the {self.api_timeout:g}s deadline (--dra-api-timeout)",
                        timed_out=True,
                    )
                return e

        if len(requested) == 1:
            return {requested[0].uid: read(requested[0])}
        with futures.ThreadPoolExecutor(
            max_workers=min(8, len(requested)), thread_name_prefix="dra read"
        ) as pool:
            return dict(zip((r.uid for r in requested), pool.map(read, requested)))

    def _prepare_one(
        self,
        ref: ClaimRef,
        doc: Any,
        record: Dict[str, PreparedClaim],
        offered: Dict[str, str],
    ) -> PreparedClaim:
        known = record.get(ref.uid)
        if known is not None and (known.namespace, known.name) != (ref.namespace, ref.name):
            known = None
        try:
            if isinstance(doc, ReadError):
                raise ClaimError(f"{ref}: {doc}")
            if known is not None:
                # Its own NICs may be in its pod now (no netdev here): offered to it all the same.
                offered = dict(offered)
                offered.update({d.device: d.pci_address for d in known.devices})
            claim = prepare.prepare(doc, ref, driver=self.driver, node=self.node, offered=offered)
        except ClaimError as e:
            if known is None:
                raise
            # Prepared before: the kubelet repeats the call (it restarted, or lost our answer).
            # The record holds the answer; what the API says now does not change it.
            log.info("DRA: %s already prepared; answering from the record (%s)", ref, e)
            return known
        for other in record.values():
            if other.uid == claim.uid:
                continue
            taken = {d.pci_address for d in other.devices} & {d.pci_address for d in claim.devices}
            if taken:
                raise ClaimError(
                    f"{ref}: NIC {', '.join(sorted(taken))} is held by prepared claim "
                    f"{other.namespace}/{other.name} (uid {other.uid}); expected a NIC no other "
                    "claim holds (a stale allocation? that claim is unprepared when its pod ends)"
                )
        if known is None:
            log.info(
                "DRA: prepared %s (uid %s): %s for pods %s",
                ref,
                ref.uid,
                ", ".join(f"{d.device} ({d.pci_address})" for d in claim.devices),
                ", ".join(f"{p.namespace}/{p.name}" for p in claim.pods) or "none",
            )
        return claim

    def node_unprepare(self, requested: Sequence[ClaimRef]) -> Dict[str, str]:
        """claim uid -> error ("" on success) for every claim asked for. Forgetting a claim
        that is not in the record is success (the call repeats after restarts)."""
        changed = []
        with self._record_lock:
            record = dict(self._claims)
            for ref in requested:
                gone = record.pop(ref.uid, None)
                if gone is not None:
                    changed.append(ref)
                    log.info("DRA: unprepared %s (uid %s)", ref, ref.uid)
                metrics.DRA_CLAIM_RESULTS.labels("unprepare", "ok").inc()
            if changed:
                self._save(record)
        self.after_record_change(changed)
        return {ref.uid: "" for ref in requested}

    def _save(self, record: Dict[str, PreparedClaim]) -> None:
        # Called with _record_lock held. The record in memory changes only once it is on disk.
        try:
            claims.save(self.state_dir, record, driver=self.driver, node=self.node)
        except (OSError, ValueError) as e:
            raise RecordError(
                f"cannot write the claim record in {self.state_dir}: {e}; nothing was changed"
            ) from None
        self._claims = record
        metrics.DRA_CLAIMS.set(len(record))

    def after_record_change(self, changed: Sequence[ClaimRef]) -> None:
        if not changed:
            return
        self.inventory.wake()  # health streams: a held NIC's problem may differ
        self.publish()
        if self.on_claims is not None:
            self.on_claims(changed)


class RecordError(RuntimeError):
    """The claim record could not be written."""


def _requested(context: Any, claims_in: Iterable[Any]) -> List[ClaimRef]:
    out = []
    for i, c in enumerate(claims_in):
        if not c.uid or not c.namespace or not c.name:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"claims[{i}]: uid, namespace and name are required, got uid {c.uid!r}, "
                f"namespace {c.namespace!r}, name {c.name!r}",
            )
        out.append(_claim_ref(c))
    return out


class RegistrationServicer(pluginregistration_pb2_grpc.RegistrationServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self._plugin = plugin

    def GetInfo(self, request, context):  # noqa: N802 (gRPC names)
        return self._plugin.plugin_info()

    def NotifyRegistrationStatus(self, request, context):  # noqa: N802
        self._plugin.registration_status(request.plugin_registered, request.error)
        return pluginregistration_pb2.RegistrationStatusResponse()


class PrepareServicer(dra_pb2_grpc.DRAPluginServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self._plugin = plugin

    def NodePrepareResources(self, request, context):  # noqa: N802
        requested = _requested(context, request.claims)
        try:
            results = self._plugin.node_prepare(requested)
        except RecordError as e:
            log.error("DRA: NodePrepareResources failed: %s", e)
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        response = dra_pb2.NodePrepareResourcesResponse()
        for uid, (devices, error) in results.items():
            entry = response.claims[uid]
            if error:
                entry.error = error
            else:
                entry.devices.extend(devices)
        return response

    def NodeUnprepareResources(self, request, context):  # noqa: N802
        requested = _requested(context, request.claims)
        try:
            results = self._plugin.node_unprepare(requested)
        except RecordError as e:
            log.error("DRA: NodeUnprepareResources failed: %s", e)
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        response = dra_pb2.NodeUnprepareResourcesResponse()
        for uid, error in results.items():
            response.claims[uid].error = error
        return response


class PrepareServicerV1beta1(dra_v1beta1_pb2_grpc.DRAPluginServicer):
    """v1beta1 carries the same messages as v1 (less Device.share_id, which virtdp never
    sets): requests and answers are converted through their encoding."""

    def __init__(self, plugin: DraPlugin) -> None:
        self._v1 = PrepareServicer(plugin)

    def NodePrepareResources(self, request, context):  # noqa: N802
        answer = self._v1.NodePrepareResources(
            dra_pb2.NodePrepareResourcesRequest.FromString(request.SerializeToString()), context
        )
        return dra_v1beta1_pb2.NodePrepareResourcesResponse.FromString(answer.SerializeToString())

    def NodeUnprepareResources(self, request, context):  # noqa: N802
        answer = self._v1.NodeUnprepareResources(
            dra_pb2.NodeUnprepareResourcesRequest.FromString(request.SerializeToString()), context
        )
        return dra_v1beta1_pb2.NodeUnprepareResourcesResponse.FromString(answer.SerializeToString())


class HealthServicer(drahealth_pb2_grpc.DRAResourceHealthServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self._plugin = plugin

    def NodeWatchResources(  # noqa: N802
        self, request, context
    ) -> Iterator[drahealth_pb2.NodeWatchResourcesResponse]:
        plugin = self._plugin
        inv = plugin.inventory
        stopped = plugin.stopped_event
        context.add_callback(inv.wake)  # the kubelet went away: stop waiting
        last: Optional[List[Tuple[str, Optional[str]]]] = None
        sent_at = 0.0
        log.info("DRA: kubelet opened NodeWatchResources")
        while context.is_active() and not stopped.is_set():
            version = inv.version
            devices = plugin.devices()
            state = [(d.name, d.problem) for d in devices]
            now = time.monotonic()
            if state != last or now - sent_at >= HEALTH_RESEND:
                last, sent_at = state, now
                metrics.DRA_HEALTH_UPDATES.inc()
                yield _health(devices, plugin.node)
            inv.wait_for_change(version, timeout=max(0.0, sent_at + HEALTH_RESEND - now))
        log.debug("DRA: NodeWatchResources ended")


def _health(devices: Sequence[DraDevice], node: str) -> drahealth_pb2.NodeWatchResourcesResponse:
    now = int(time.time())
    out = drahealth_pb2.NodeWatchResourcesResponse()
    for d in devices:
        out.devices.add(
            device=drahealth_pb2.DeviceIdentifier(pool_name=node, device_name=d.name),
            health=drahealth_pb2.HEALTHY if d.healthy else drahealth_pb2.UNHEALTHY,
            last_updated_time=now,
            health_check_timeout_seconds=HEALTH_TIMEOUT,
            message=_MESSAGES.get(d.problem or "", ""),
        )
    return out
