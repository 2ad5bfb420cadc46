"""THE test kubelet: the device-manager side of the device plugin API, as the real kubelet does it.

Checked against kubernetes `pkg/kubelet/cm/devicemanager` (manager.go, endpoint.go,
pod_devices.go) and `plugin/v1beta1` (server.go, handler.go, client.go, api.go):

- start (server.Start + ManagerImpl.CleanupPluginDirectory): remove every non-directory in the
  directory except the checkpoint (kubelets up to 1.3x; the newest remove only sockets, and a
  plugin only has sockets there), then serve `Registration` on `kubelet.sock`. Resources known
  from before a restart come back as *stopped* endpoints with no devices (readCheckpoint ->
  newStoppedEndpointImpl) and the allocations survive, until the plugin registers again.
- Register: version must be in SupportedVersions, the resource name must pass
  v1helper.IsExtendedResourceName, the socket is `filepath.Join(dir, endpoint)` (Go's Join: an
  absolute or `..` endpoint does not escape the way os.path.join would). Before answering it
  dials the plugin (blocking, 10 s, authority "localhost") and calls GetDevicePluginOptions
  (PluginConnected); errors go back as gRPC UNKNOWN with the kubelet's message. The options of
  the RegisterRequest are ignored: GetDevicePluginOptions' answer counts. Then ListAndWatch
  runs in the background; each response replaces the resource's device list (health "Healthy"
  is healthy, any other string unhealthy).
- stream end (runClient -> disconnectClient -> PluginDisconnected): the resource's *current*
  endpoint is stopped and its devices turn unhealthy, even when the ended stream belonged to an
  older registration; kubelets 1.26-1.3x also close the current client's connection. A stopped
  endpoint refuses GetPreferredAllocation, Allocate and PreStartContainer (errEndpointStopped)
  and its resource leaves the node's capacity `grace` (5 min) after the stop (GetCapacity).
- allocate (devicesToAllocate + allocateContainerResources): healthy minus allocated; if the
  plugin's options ask for it, GetPreferredAllocation(available, must-include, size) with the
  lists in set (random) order, keep its IDs that are available, fill up from the rest; then
  Allocate with one container request (IDs in random order); a response without container
  responses fails, extra ones are ignored. PreStartContainer only when pre_start_required.
- checkpoint (opt-in, `checkpoint=True`): written after each ListAndWatch update and each
  allocation, in the kubelet's JSON shape (the checksum is a Go hash: written as 0).

Runs in the test process (threads); the plugin under test is another process.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import random
import re
import stat
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import grpc

from virtcore.kubelet import deviceplugin_pb2 as pb
from virtcore.kubelet import deviceplugin_pb2_grpc as pbg

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT = 10.0
PRESTART_TIMEOUT = 30.0  # KubeletPreStartContainerRPCTimeoutInSecs
STOP_GRACE = 300.0  # endpointStopGracePeriod

# k8s.io/apimachinery/pkg/util/validation (Go regexps anchor at the very end: use fullmatch).
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def _is_qualified_name(value: str) -> bool:
    """validation.IsQualifiedName: `[prefix/]name`, prefix a DNS-1123 subdomain (<= 253)."""
    parts = value.split("/")
    if len(parts) > 2:
        return False
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
            return False
    name = parts[-1]
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.fullmatch(name))


def is_extended_resource_name(name: str) -> bool:
    """v1helper.IsExtendedResourceName."""
    # IsNativeResource: no "/" at all, or "kubernetes.io/" anywhere in the name.
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    return _is_qualified_name("requests." + name)


def go_join(directory: str, name: str) -> str:
    """filepath.Join: concatenate with "/" and clean (an absolute `name` stays inside)."""
    return posixpath.normpath(directory.rstrip("/") + "/" + name)


@dataclass
class DeviceState:
    health: str
    numa_nodes: Tuple[int, ...]


@dataclass
class Endpoint:
    """One registered plugin, like the kubelet's endpointImpl + plugin client."""

    resource: str
    socket_path: str
    options: Optional[pb.DevicePluginOptions]
    channel: Optional[grpc.Channel]
    stub: Optional[pbg.DevicePluginStub]
    registered_at: float
    stop_time: Optional[float] = None
    updates: int = 0
    generation: int = 0  # which kubelet "process" made it


@dataclass
class _Allocation:
    owner: str
    resource: str
    pod_uid: str
    container: str
    by_numa: Dict[int, List[str]]
    response: bytes = b""
    devices: List[str] = field(default_factory=list)


class AllocationFailed(RuntimeError):
    pass


class TestKubelet(pbg.RegistrationServicer):
    __test__ = False  # not a pytest class

    def __init__(self, directory: str, *, checkpoint: bool = False) -> None:
        self.dir = directory
        self.socket_path = os.path.join(directory, KUBELET_SOCKET)
        self.write_checkpoints = checkpoint
        self.grace = STOP_GRACE
        self._cond = threading.Condition()
        self._server: Optional[grpc.Server] = None
        self._generation = 0
        self.endpoints: Dict[str, Endpoint] = {}
        self.devices: Dict[str, Dict[str, DeviceState]] = {}
        self.allocated: Dict[str, Dict[str, str]] = {}  # resource -> device -> "pod/container"
        self._allocations: List[_Allocation] = []
        self.registrations: List[Tuple[float, pb.RegisterRequest]] = []
        self.register_errors: List[str] = []
        self.updates: List[Tuple[float, str, Dict[str, DeviceState]]] = []
        self.prestarts: List[Tuple[str, List[str]]] = []
        self.started_at = 0.0
        self.restarts = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with self._cond:
            self._generation += 1
            # readCheckpoint: known resources wait as stopped endpoints with no devices.
            now = time.monotonic()
            for resource in set(self.devices) | set(self.allocated):
                self.endpoints[resource] = Endpoint(
                    resource, "", None, None, None, now, stop_time=now, generation=0
                )
                self.devices[resource] = {}
        self._cleanup_directory()
        if self.write_checkpoints:
            self._write_checkpoint()
        elif not os.path.exists(os.path.join(self.dir, CHECKPOINT)):
            self._write_json(
                {"Data": {"PodDeviceEntries": None, "RegisteredDevices": {}}, "Checksum": 0}
            )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pbg.add_RegistrationServicer_to_server(self, server)
        if server.add_insecure_port("unix://" + os.path.abspath(self.socket_path)) == 0:
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        server.start()
        with self._cond:
            self._server = server
            self.started_at = time.monotonic()
            self._cond.notify_all()

    def stop(self) -> None:
        """The kubelet process going away: its server and every plugin connection close."""
        with self._cond:
            server, self._server = self._server, None
            eps = [e for e in self.endpoints.values() if e.channel is not None]
            self.endpoints.clear()
            self._generation += 1  # the old process's client threads change nothing now
        if server is not None:
            server.stop(grace=None)
        for ep in eps:
            ep.channel.close()  # type: ignore[union-attr]
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def restart(self) -> float:
        """Stop, then start like a new kubelet process; returns the restart's monotonic time.
        What the checkpoint holds (allocations, known resources) survives."""
        known = set(self.devices)
        self.stop()
        with self._cond:
            for resource in known:
                self.devices.setdefault(resource, {})
            self.restarts += 1
        self.start()
        return self.started_at

    def __enter__(self) -> TestKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _cleanup_directory(self) -> None:
        # CleanupPluginDirectory: every non-directory but the checkpoint.
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name == CHECKPOINT:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            os.unlink(path)

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint_data(self) -> dict:
        """writeCheckpoint's document (Go's json: sorted map keys, nil slices as null)."""
        with self._cond:
            entries = [
                {
                    "PodUID": a.pod_uid,
                    "ContainerName": a.container,
                    "ResourceName": a.resource,
                    "DeviceIDs": {str(n): ids for n, ids in sorted(a.by_numa.items())},
                    "AllocResp": base64.b64encode(a.response).decode(),
                }
                for a in self._allocations
            ]
            registered = {
                r: sorted(i for i, d in devs.items() if d.health == "Healthy")
                for r, devs in sorted(self.devices.items())
            }
        return {
            "Data": {"PodDeviceEntries": entries or None, "RegisteredDevices": registered},
            "Checksum": 0,
        }

    def _write_checkpoint(self) -> None:
        if self.write_checkpoints:
            self._write_json(self.checkpoint_data())

    def _write_json(self, doc: dict) -> None:
        path = os.path.join(self.dir, CHECKPOINT)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)

    # -- Registration service --------------------------------------------------------------
    def Register(self, request, context):  # noqa: N802
        with self._cond:
            self.registrations.append((time.monotonic(), request))
            generation = self._generation
            self._cond.notify_all()
        if request.version not in SUPPORTED_VERSIONS:
            return self._refuse(
                context,
                f"requested API version {json.dumps(request.version)} is not supported by "
                f"kubelet. Supported version is {json.dumps(list(SUPPORTED_VERSIONS))}",
            )
        if not is_extended_resource_name(request.resource_name):
            return self._refuse(
                context, f"the ResourceName {json.dumps(request.resource_name)} is invalid"
            )
        socket_path = go_join(self.dir, request.endpoint)
        channel = grpc.insecure_channel(
            "unix://" + socket_path, options=[("grpc.default_authority", "localhost")]
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
        except grpc.FutureTimeoutError:
            channel.close()
            return self._refuse(
                context, f"failed to dial device plugin: {socket_path}: context deadline exceeded"
            )
        stub = pbg.DevicePluginStub(channel)
        try:
            # The kubelet sets no deadline here; ours only keeps a hung plugin from hanging CI.
            options = stub.GetDevicePluginOptions(pb.Empty(), timeout=60)
        except grpc.RpcError as e:
            channel.close()
            return self._refuse(context, f"failed to get device plugin options: {e.details()}")
        ep = Endpoint(
            resource=request.resource_name,
            socket_path=socket_path,
            options=options,
            channel=channel,
            stub=stub,
            registered_at=time.monotonic(),
            generation=generation,
        )
        with self._cond:
            if generation != self._generation:
                channel.close()
                return pb.Empty()
            # An older client of this resource keeps running until its stream ends.
            self.endpoints[request.resource_name] = ep
            self._cond.notify_all()
        threading.Thread(
            target=self._run_client, args=(ep,), name=f"law {request.resource_name}", daemon=True
        ).start()
        return pb.Empty()

    def _refuse(self, context, message: str):
        with self._cond:
            self.register_errors.append(message)
            self._cond.notify_all()
        context.abort(grpc.StatusCode.UNKNOWN, message)

    def _run_client(self, ep: Endpoint) -> None:
        assert ep.stub is not None
        try:
            for response in ep.stub.ListAndWatch(pb.Empty()):
                state = {
                    d.ID: DeviceState(d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in response.devices
                }
                with self._cond:
                    if ep.generation != self._generation:
                        return
                    ep.updates += 1
                    self.devices[ep.resource] = state
                    self.updates.append((time.monotonic(), ep.resource, state))
                    self._cond.notify_all()
                self._write_checkpoint()
        except grpc.RpcError:
            pass
        # PluginDisconnected: the resource's current endpoint stops, its devices turn unhealthy.
        with self._cond:
            if ep.generation != self._generation:
                return
            current = self.endpoints.get(ep.resource)
            if current is not None:
                if current.stop_time is None:
                    current.stop_time = time.monotonic()
                for dev in self.devices.get(ep.resource, {}).values():
                    dev.health = "Unhealthy"
            self._cond.notify_all()
        if current is not None and current is not ep and current.channel is not None:
            current.channel.close()  # disconnectClient(name, getClient(name)) before 1.3x

    # -- queries for tests -----------------------------------------------------------------
    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=timeout):
                raise AssertionError(
                    f"test kubelet: timed out after {timeout}s waiting for {what}; "
                    f"devices={self.devices_summary()} registrations="
                    f"{[r.resource_name for _, r in self.registrations]} "
                    f"errors={self.register_errors}"
                )

    def devices_summary(self) -> Dict[str, Dict[str, str]]:
        return {r: {i: d.health for i, d in devs.items()} for r, devs in self.devices.items()}

    def active(self, resource: str) -> bool:
        ep = self.endpoints.get(resource)
        return ep is not None and ep.stop_time is None and ep.updates > 0

    def wait_registered(self, resource: str, timeout: float = 10.0) -> Endpoint:
        self.wait(lambda: self.active(resource), timeout, f"{resource} to register and list")
        return self.endpoints[resource]

    def health(self, resource: str) -> Dict[str, str]:
        with self._cond:
            return {i: d.health for i, d in self.devices.get(resource, {}).items()}

    def wait_health(self, resource: str, expected: Dict[str, str], timeout: float = 10.0) -> None:
        self.wait(
            lambda: self.active(resource)
            and {i: d.health for i, d in self.devices.get(resource, {}).items()} == expected,
            timeout,
            f"{resource} devices {expected}",
        )

    def update_count(self, resource: str) -> int:
        with self._cond:
            return sum(1 for _, r, _ in self.updates if r == resource)

    def capacity(self) -> Tuple[Dict[str, int], Dict[str, int], List[str]]:
        """GetCapacity: (capacity, allocatable, deleted resources). A resource whose endpoint
        stopped more than `grace` seconds ago is dropped; before that its devices still count
        in capacity (unhealthy), not in allocatable."""
        cap: Dict[str, int] = {}
        alloc: Dict[str, int] = {}
        deleted: List[str] = []
        now = time.monotonic()
        with self._cond:
            for resource in sorted(self.devices):
                ep = self.endpoints.get(resource)
                if ep is None or (ep.stop_time is not None and now - ep.stop_time > self.grace):
                    self.endpoints.pop(resource, None)
                    del self.devices[resource]
                    deleted.append(resource)
                    continue
                devs = self.devices[resource]
                alloc[resource] = sum(1 for d in devs.values() if d.health == "Healthy")
                cap[resource] = len(devs)
        if deleted:
            self._write_checkpoint()
        return cap, alloc, deleted

    # -- allocation, as the device manager does it -----------------------------------------
    def _live_endpoint(self, resource: str) -> Endpoint:
        ep = self.endpoints.get(resource)
        if ep is None:
            raise AllocationFailed(f"unknown Device Plugin {resource}")
        if ep.stop_time is not None or ep.stub is None:
            raise AllocationFailed(f"endpoint {ep.socket_path or resource} has been stopped")
        return ep

    def allocate(
        self,
        resource: str,
        needed: int,
        owner: str = "pod/container",
        *,
        pod_uid: Optional[str] = None,
    ) -> Tuple[List[str], pb.ContainerAllocateResponse]:
        """Allocate `needed` devices to `owner` ("<pod>/<container>", the container name after
        the last "/"); returns the IDs in the order sent and the container's response."""
        with self._cond:
            if resource not in self.devices:
                raise AllocationFailed(f"cannot allocate unregistered device {resource}")
            devs = self.devices[resource]
            healthy = {i for i, d in devs.items() if d.health == "Healthy"}
            if not healthy:
                raise AllocationFailed(
                    f"no healthy devices present; cannot allocate unhealthy devices {resource}"
                )
            in_use = set(self.allocated.get(resource, {}))
            available = healthy - in_use
            if len(available) < needed:
                raise AllocationFailed(
                    f"requested number of devices unavailable for {resource}. "
                    f"Requested: {needed}, Available: {len(available)}"
                )
            ep = self.endpoints.get(resource)
        chosen: List[str] = []
        if (
            ep is not None
            and ep.options is not None
            and ep.options.get_preferred_allocation_available
        ):
            live = self._live_endpoint(resource)
            assert live.stub is not None
            try:
                resp = live.stub.GetPreferredAllocation(
                    pb.PreferredAllocationRequest(
                        container_requests=[
                            pb.ContainerPreferredAllocationRequest(
                                available_deviceIDs=_set_order(available),
                                must_include_deviceIDs=[],
                                allocation_size=needed,
                            )
                        ]
                    ),
                    timeout=60,
                )
            except grpc.RpcError as e:
                raise AllocationFailed(
                    f"device plugin GetPreferredAllocation rpc failed with err: {e.details()}"
                ) from None
            if resp.container_responses:
                pref = set(resp.container_responses[0].deviceIDs) & available
                chosen = _set_order(pref)[:needed]
        rest = available - set(chosen)
        chosen += _set_order(rest)[: needed - len(chosen)]
        live = self._live_endpoint(resource)
        assert live.stub is not None
        try:
            response = live.stub.Allocate(
                pb.AllocateRequest(
                    container_requests=[pb.ContainerAllocateRequest(devices_ids=chosen)]
                ),
                timeout=60,
            )
        except grpc.RpcError as e:
            raise AllocationFailed(f"{e.code().name}: {e.details()}") from None
        if not response.container_responses:
            raise AllocationFailed(f"no containers return in allocation response {response}")
        first = response.container_responses[0]
        pod, _, container = owner.rpartition("/")
        by_numa: Dict[int, List[str]] = {}
        with self._cond:
            for d in chosen:
                self.allocated.setdefault(resource, {})[d] = owner
                nodes = devs[d].numa_nodes or (-1,)
                for n in nodes:
                    by_numa.setdefault(n, []).append(d)
            self._allocations.append(
                _Allocation(
                    owner,
                    resource,
                    pod_uid or pod or owner,
                    container or owner,
                    by_numa,
                    first.SerializeToString(),
                    list(chosen),
                )
            )
        self._write_checkpoint()
        return chosen, first

    def prestart(self, resource: str, owner: str) -> Optional[pb.PreStartContainerResponse]:
        """callPreStartContainerIfNeeded: only when the plugin asked for it (30 s deadline)."""
        ep = self.endpoints.get(resource)
        if ep is None:
            raise AllocationFailed(
                f"endpoint not found in cache for a registered resource: {resource}"
            )
        if ep.options is None or not ep.options.pre_start_required:
            return None
        devs = [d for d, o in self.allocated.get(resource, {}).items() if o == owner]
        if not devs:
            raise AllocationFailed(f"no devices found allocated in local cache for {owner}")
        live = self._live_endpoint(resource)
        assert live.stub is not None
        self.prestarts.append((owner, devs))
        try:
            return live.stub.PreStartContainer(
                pb.PreStartContainerRequest(devices_ids=devs), timeout=PRESTART_TIMEOUT
            )
        except grpc.RpcError as e:
            raise AllocationFailed(
                f"device plugin PreStartContainer rpc failed with err: {e.details()}"
            ) from None

    def release(self, resource: str, owner: str) -> None:
        with self._cond:
            alloc = self.allocated.get(resource, {})
            for d in [d for d, o in alloc.items() if o == owner]:
                del alloc[d]
            self._allocations = [
                a for a in self._allocations if not (a.owner == owner and a.resource == resource)
            ]

    def preferred(
        self, resource: str, available: Sequence[str], must: Sequence[str], size: int
    ) -> pb.PreferredAllocationResponse:
        return self.raw_preferred(
            resource,
            [
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must),
                    allocation_size=size,
                )
            ],
        )

    def raw_preferred(
        self, resource: str, requests: Sequence[pb.ContainerPreferredAllocationRequest]
    ) -> pb.PreferredAllocationResponse:
        """Straight to the plugin, whatever the endpoint's state (for malformed requests)."""
        ep = self.endpoints[resource]
        assert ep.stub is not None, f"{resource}: no connection since the restart"
        return ep.stub.GetPreferredAllocation(
            pb.PreferredAllocationRequest(container_requests=list(requests)), timeout=10
        )

    def raw_allocate(self, resource: str, requests: Sequence[Sequence[str]]) -> pb.AllocateResponse:
        """Straight to the plugin, whatever the endpoint's state (for malformed requests)."""
        ep = self.endpoints[resource]
        assert ep.stub is not None, f"{resource}: no connection since the restart"
        return ep.stub.Allocate(
            pb.AllocateRequest(
                container_requests=[
                    pb.ContainerAllocateRequest(devices_ids=list(r)) for r in requests
                ]
            ),
            timeout=10,
        )


def _set_order(ids: Set[str]) -> List[str]:
    """A Go set's UnsortedList(): no order to rely on."""
    out = list(ids)
    random.shuffle(out)
    return out
