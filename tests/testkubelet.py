"""THE test kubelet: the device-manager side of the device plugin API, as the real kubelet does it.

Modelled on kubernetes `pkg/kubelet/cm/devicemanager` (manager.go, endpoint.go) and
`plugin/v1beta1` (server.go, handler.go, client.go):

- start: clean the directory (every file except the checkpoint; older kubelets removed every
  file, newer ones every socket: our plugins only have sockets there), then serve
  `Registration` on `kubelet.sock`.
- Register: check the version (v1beta1) and that the resource name is an extended resource
  name, then, before answering, dial `<dir>/<endpoint>` (blocking, 10 s deadline, authority
  "localhost") and call GetDevicePluginOptions; then run ListAndWatch in the background.
  Each ListAndWatch response replaces the resource's device list (healthy/unhealthy sets).
  When the stream ends, the resource's devices all turn unhealthy and its endpoint is marked
  stopped (the real kubelet does this even if the plugin re-registered meanwhile).
- allocate: healthy minus allocated devices; if the plugin asked for it, GetPreferredAllocation
  (available, must-include, size) and take its answer, else any; then Allocate with one
  container request and reject a response without container responses.
- restart: the old process's connections close, the new one cleans the directory and
  recreates kubelet.sock.

Runs in the test process (threads); the plugin under test is another process.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc

from virtcore.kubelet import deviceplugin_pb2 as pb
from virtcore.kubelet import deviceplugin_pb2_grpc as pbg

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT = 10.0

# k8s.io/apimachinery validation: a qualified name with a DNS-subdomain prefix.
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def is_extended_resource_name(name: str) -> bool:
    """v1helper.IsExtendedResourceName: `<domain>/<name>`, not in kubernetes.io, valid."""
    if "/" not in name or name.startswith("requests."):
        return False
    prefix, _, short = name.partition("/")
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        return False
    if "/" in short or len(short) > 63 or not _QUALIFIED_NAME.match(short):
        return False
    # The kubelet also checks that "requests.<name>" is a valid quota resource name.
    return len(prefix) <= 253 and bool(_DNS1123_SUBDOMAIN.match(prefix))


@dataclass
class DeviceState:
    health: str
    numa_nodes: Tuple[int, ...]


@dataclass
class Endpoint:
    """One registered plugin, like the kubelet's endpointImpl + plugin client."""

    resource: str
    socket_path: str
    options: pb.DevicePluginOptions
    channel: grpc.Channel
    stub: pbg.DevicePluginStub
    registered_at: float
    stop_time: Optional[float] = None
    updates: int = 0


class AllocationFailed(RuntimeError):
    pass


class TestKubelet(pbg.RegistrationServicer):
    __test__ = False  # not a pytest class

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.socket_path = os.path.join(directory, KUBELET_SOCKET)
        self._cond = threading.Condition()
        self._server: Optional[grpc.Server] = None
        self.endpoints: Dict[str, Endpoint] = {}
        self.devices: Dict[str, Dict[str, DeviceState]] = {}
        self.allocated: Dict[str, Dict[str, str]] = {}  # resource -> device -> "pod/container"
        self.registrations: List[Tuple[float, pb.RegisterRequest]] = []
        self.register_errors: List[str] = []
        self.updates: List[Tuple[float, str, Dict[str, DeviceState]]] = []
        self.started_at = 0.0
        self.restarts = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self._cleanup_directory()
        self._write_checkpoint()
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
            eps = list(self.endpoints.values())
            self.endpoints.clear()
        if server is not None:
            server.stop(grace=None)
        for ep in eps:
            ep.channel.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def restart(self) -> float:
        """Stop, then start like a new kubelet process; returns the restart's monotonic time."""
        self.stop()
        with self._cond:
            self.devices.clear()
            self.allocated.clear()
            self.restarts += 1
        self.start()
        return self.started_at

    def __enter__(self) -> TestKubelet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _cleanup_directory(self) -> None:
        # ManagerImpl.CleanupPluginDirectory: everything but the checkpoint and directories.
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

    def _write_checkpoint(self) -> None:
        path = os.path.join(self.dir, CHECKPOINT)
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump(
                    {"Data": {"PodDeviceEntries": [], "RegisteredDevices": {}}, "Checksum": 0}, f
                )

    # -- Registration service --------------------------------------------------------------
    def Register(self, request, context):  # noqa: N802
        with self._cond:
            self.registrations.append((time.monotonic(), request))
            self._cond.notify_all()
        if request.version not in SUPPORTED_VERSIONS:
            return self._refuse(
                context,
                f"Requested device plugin version {request.version!r} is not supported; "
                f"supported versions: {list(SUPPORTED_VERSIONS)}",
            )
        if not is_extended_resource_name(request.resource_name):
            return self._refuse(context, f"invalid resource name {request.resource_name!r}")
        socket_path = os.path.join(self.dir, request.endpoint)
        channel = grpc.insecure_channel(
            "unix://" + os.path.abspath(socket_path),
            options=[("grpc.default_authority", "localhost")],
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
        except grpc.FutureTimeoutError:
            channel.close()
            return self._refuse(context, f"failed to dial device plugin at {socket_path}")
        stub = pbg.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(pb.Empty(), timeout=DIAL_TIMEOUT)
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
        )
        with self._cond:
            # A previous client of this resource keeps running until its stream ends.
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
        try:
            for response in ep.stub.ListAndWatch(pb.Empty()):
                state = {
                    d.ID: DeviceState(d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in response.devices
                }
                with self._cond:
                    ep.updates += 1
                    self.devices[ep.resource] = state
                    self.updates.append((time.monotonic(), ep.resource, state))
                    self._cond.notify_all()
        except grpc.RpcError:
            pass
        # PluginDisconnected: the resource's devices turn unhealthy, its endpoint is stopped.
        with self._cond:
            current = self.endpoints.get(ep.resource)
            if current is not None:
                current.stop_time = time.monotonic()
                for dev in self.devices.get(ep.resource, {}).values():
                    dev.health = "Unhealthy"
            self._cond.notify_all()

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

    # -- allocation, as the device manager does it -----------------------------------------
    def allocate(
        self, resource: str, needed: int, owner: str = "pod/container"
    ) -> Tuple[List[str], pb.ContainerAllocateResponse]:
        with self._cond:
            ep = self.endpoints.get(resource)
            if ep is None:
                raise AllocationFailed(f"cannot allocate unregistered device {resource}")
            devs = self.devices.get(resource, {})
            healthy = {i for i, d in devs.items() if d.health == "Healthy"}
            if not healthy:
                raise AllocationFailed(f"no healthy devices present; cannot allocate {resource}")
            in_use = set(self.allocated.get(resource, {}))
            available = healthy - in_use
            if len(available) < needed:
                raise AllocationFailed(
                    f"requested number of devices unavailable for {resource}. "
                    f"Requested: {needed}, Available: {len(available)}"
                )
        chosen: List[str] = []
        if ep.options.get_preferred_allocation_available:
            resp = self.preferred(resource, sorted(available), [], needed)
            if resp.container_responses:
                chosen = [d for d in resp.container_responses[0].deviceIDs if d in available][
                    :needed
                ]
        for d in sorted(available):
            if len(chosen) >= needed:
                break
            if d not in chosen:
                chosen.append(d)
        response = self.raw_allocate(resource, [chosen])
        if not response.container_responses:
            raise AllocationFailed(f"no containers return in allocation response {response}")
        with self._cond:
            for d in chosen:
                self.allocated.setdefault(resource, {})[d] = owner
        return chosen, response.container_responses[0]

    def release(self, resource: str, owner: str) -> None:
        with self._cond:
            alloc = self.allocated.get(resource, {})
            for d in [d for d, o in alloc.items() if o == owner]:
                del alloc[d]

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
        ep = self.endpoints[resource]
        return ep.stub.GetPreferredAllocation(
            pb.PreferredAllocationRequest(container_requests=list(requests)), timeout=10
        )

    def raw_allocate(self, resource: str, requests: Sequence[Sequence[str]]) -> pb.AllocateResponse:
        ep = self.endpoints[resource]
        return ep.stub.Allocate(
            pb.AllocateRequest(
                container_requests=[
                    pb.ContainerAllocateRequest(devices_ids=list(r)) for r in requests
                ]
            ),
            timeout=10,
        )
