"""Client of the kubelet's pod-resources API v1 (List, Get, GetAllocatableResources).

Answers are returned as plain frozen dataclasses, one `ContainerDevices` per group the kubelet
sent (recent kubelets send one per device ID, older ones one per resource and NUMA node), and
per container the DRA claims it uses (`DynamicResource`, one `ClaimResource` per device).
Every call has a deadline. Failures are split in two, because callers treat them differently:
`Unavailable` (nothing usable answers on the socket: absent, refusing, hung, not gRPC) and
`CallFailed` (a gRPC server answered with an error, e.g. the method is not implemented or the
pod does not exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import grpc

from virtcore.kubelet import channel, podresources_pb2, podresources_pb2_grpc

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


class PodResourcesError(ConnectionError):
    def __init__(self, socket_path: str, message: str) -> None:
        self.socket_path = socket_path
        super().__init__(message)


class Unavailable(PodResourcesError):
    """No pod-resources server answers on the socket."""


class CallFailed(PodResourcesError):
    """The server answered the call with an error status."""

    def __init__(self, socket_path: str, message: str, code: grpc.StatusCode) -> None:
        self.code = code
        super().__init__(socket_path, message)


@dataclass(frozen=True)
class ContainerDevices:
    resource_name: str
    device_ids: Tuple[str, ...]
    numa_nodes: Tuple[int, ...]  # empty when the kubelet sent no topology


@dataclass(frozen=True)
class ClaimResource:
    """One DRA device of a claim: driver, pool and device name it; its CDI device IDs."""

    driver_name: str
    pool_name: str
    device_name: str
    cdi_devices: Tuple[str, ...] = ()
    share_id: Optional[str] = None  # consumable capacity: the share of the device


@dataclass(frozen=True)
class DynamicResource:
    """A ResourceClaim the container uses, with the devices allocated to it."""

    claim_name: str
    claim_namespace: str
    claim_resources: Tuple[ClaimResource, ...]


@dataclass(frozen=True)
class ContainerResources:
    name: str
    devices: Tuple[ContainerDevices, ...]
    cpu_ids: Tuple[int, ...] = ()
    dynamic_resources: Tuple[DynamicResource, ...] = ()  # DRA (Kubernetes 1.27+, GA in 1.36)


@dataclass(frozen=True)
class PodResources:
    name: str
    namespace: str
    containers: Tuple[ContainerResources, ...]


@dataclass(frozen=True)
class Allocatable:
    devices: Tuple[ContainerDevices, ...]
    cpu_ids: Tuple[int, ...] = ()


def _devices(msgs) -> Tuple[ContainerDevices, ...]:  # type: ignore[no-untyped-def]
    return tuple(
        ContainerDevices(
            resource_name=d.resource_name,
            device_ids=tuple(d.device_ids),
            numa_nodes=tuple(n.ID for n in d.topology.nodes) if d.HasField("topology") else (),
        )
        for d in msgs
    )


def _dynamic(msgs) -> Tuple[DynamicResource, ...]:  # type: ignore[no-untyped-def]
    return tuple(
        DynamicResource(
            claim_name=d.claim_name,
            claim_namespace=d.claim_namespace,
            claim_resources=tuple(
                ClaimResource(
                    driver_name=r.driver_name,
                    pool_name=r.pool_name,
                    device_name=r.device_name,
                    cdi_devices=tuple(c.name for c in r.cdi_devices),
                    share_id=r.share_id if r.HasField("share_id") else None,
                )
                for r in d.claim_resources
            ),
        )
        for d in msgs
    )


def _pod(msg: podresources_pb2.PodResources) -> PodResources:
    return PodResources(
        name=msg.name,
        namespace=msg.namespace,
        containers=tuple(
            ContainerResources(
                name=c.name,
                devices=_devices(c.devices),
                cpu_ids=tuple(c.cpu_ids),
                dynamic_resources=_dynamic(c.dynamic_resources),
            )
            for c in msg.containers
        ),
    )


class Client:
    """A connection to the pod-resources socket; use as a context manager.

    The socket is checked on entry (`channel.probe`), so an absent, refusing or hung socket
    fails fast with a precise `Unavailable`; each call then has its own deadline.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[podresources_pb2_grpc.PodResourcesListerStub] = None

    def __enter__(self) -> Client:
        try:
            channel.probe(self.socket_path, self.timeout)
        except channel.SocketUnavailable as e:
            raise Unavailable(self.socket_path, f"pod-resources socket {e}") from None
        self._channel = channel.unix_channel(self.socket_path)
        self._stub = podresources_pb2_grpc.PodResourcesListerStub(self._channel)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None

    def _call(self, method: str, request):  # type: ignore[no-untyped-def]
        if self._stub is None:
            raise RuntimeError("Client used outside its `with` block")
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(self.socket_path, method, e, self.timeout) from None

    def list(self) -> List[PodResources]:
        resp = self._call("List", podresources_pb2.ListPodResourcesRequest())
        return [_pod(p) for p in resp.pod_resources]

    def get(self, pod_name: str, pod_namespace: str) -> PodResources:
        resp = self._call(
            "Get",
            podresources_pb2.GetPodResourcesRequest(pod_name=pod_name, pod_namespace=pod_namespace),
        )
        return _pod(resp.pod_resources)

    def allocatable(self) -> Allocatable:
        resp = self._call("GetAllocatableResources", podresources_pb2.AllocatableResourcesRequest())
        return Allocatable(devices=_devices(resp.devices), cpu_ids=tuple(resp.cpu_ids))


# First kubelet release serving each v1 method (Get and GetAllocatableResources behind feature
# gates at first).
_SINCE = {"List": "1.20", "GetAllocatableResources": "1.21", "Get": "1.27"}


def _error(socket_path: str, method: str, e: grpc.RpcError, timeout: float) -> PodResourcesError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    where = f"pod-resources socket {socket_path}: {method}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(socket_path, f"{where}: no answer within {timeout:g}s (kubelet hung?)")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(socket_path, f"{where}: unavailable: {details}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CallFailed(
            socket_path,
            f"{where}: not implemented by the server (a kubelet older than "
            f"{_SINCE.get(method, '1.20')}, or not the pod-resources socket?)",
            code,
        )
    return CallFailed(socket_path, f"{where}: {code.name}: {details}", code)
