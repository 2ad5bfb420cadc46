"""A faithful kubelet pod-resources API v1 server for tests, and the kubelet's checkpoint of the
same allocations.

It serves `v1.PodResourcesLister` on a unix socket the way the kubelet's
`pkg/kubelet/apis/podresources/server_v1.go` does:
- `List`: every pod, every container, and since Kubernetes 1.23 one `ContainerDevices` per device
  ID, with topology `{nodes: [{ID: numa}]}`, or no topology for devices the plugin gave none
  (NUMA -1). `grouping="numa"` gives the older shape instead: one group per resource and NUMA
  node, topology always set.
- `Get`: the kubelet returns a plain Go error, which gRPC sends as status UNKNOWN, both for an
  unknown pod ("pod <name> in namespace <ns> not found") and when the feature gate is off
  ("PodResources API Get method disabled").
- `GetAllocatableResources`: the registered devices, one group per device.
- DRA (`dynamic_resources`, KubeletPodResourcesDynamicResources, GA in 1.36): per container,
  one `DynamicResource` per claim the container uses (its `resources.claims`), in the pod's
  claim order, with one `ClaimResource` per prepared device, drivers in turn (the kubelet walks
  a Go map: any order; here sorted). As the kubelet's `GetDynamicResources` does, the CDI list
  is built per driver and each device's resource gets the list so far (a device's entry also
  carries the CDI IDs of the same driver's devices before it).

The model (`Pod`, `Container`) is what the kubelet's device manager holds: per container, per
resource, device IDs keyed by NUMA node. `checkpoint_json` writes the same model in the
kubelet's checkpoint format (NUMA-keyed, or the flat list of Kubernetes <= 1.19).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import grpc

from virtcore.kubelet import deviceplugin_pb2, podresources_pb2, podresources_pb2_grpc

NO_TOPOLOGY = -1  # the kubelet's nodeWithoutTopology

# resource name -> NUMA node -> device IDs
Devices = Dict[str, Dict[int, List[str]]]


@dataclass
class DraDevice:
    """One device the kubelet's DRA manager holds for a prepared claim (from NodePrepare)."""

    driver: str
    pool: str
    device: str
    cdi_device_ids: List[str] = field(default_factory=list)
    share_id: Optional[str] = None


@dataclass
class Claim:
    """A prepared ResourceClaim a container uses (in the pod's namespace)."""

    name: str
    devices: List[DraDevice] = field(default_factory=list)


@dataclass
class Container:
    name: str
    devices: Devices = field(default_factory=dict)
    cpu_ids: List[int] = field(default_factory=list)
    claims: List[Claim] = field(default_factory=list)


@dataclass
class Pod:
    name: str
    namespace: str
    uid: str
    containers: List[Container] = field(default_factory=list)


def _topology(numa: int) -> Optional[podresources_pb2.TopologyInfo]:
    if numa == NO_TOPOLOGY:
        return None
    return podresources_pb2.TopologyInfo(nodes=[podresources_pb2.NUMANode(ID=numa)])


def _groups(devices: Devices, grouping: str) -> List[podresources_pb2.ContainerDevices]:
    out = []
    for resource in sorted(devices):
        for numa, ids in sorted(devices[resource].items()):
            if not ids:
                continue
            if grouping == "numa":
                out.append(
                    podresources_pb2.ContainerDevices(
                        resource_name=resource,
                        device_ids=ids,
                        topology=podresources_pb2.TopologyInfo(
                            nodes=[podresources_pb2.NUMANode(ID=numa)]
                        ),
                    )
                )
                continue
            for dev_id in ids:
                msg = podresources_pb2.ContainerDevices(resource_name=resource, device_ids=[dev_id])
                topo = _topology(numa)
                if topo is not None:
                    msg.topology.CopyFrom(topo)
                out.append(msg)
    return out


def _dynamic(claims: List[Claim], namespace: str) -> List[podresources_pb2.DynamicResource]:
    out = []
    for claim in claims:
        resources = []
        for driver in sorted({d.driver for d in claim.devices}):
            cdi: List[str] = []  # per driver, growing: the kubelet's own loop
            for d in (d for d in claim.devices if d.driver == driver):
                cdi.extend(d.cdi_device_ids)
                r = podresources_pb2.ClaimResource(
                    cdi_devices=[podresources_pb2.CDIDevice(name=n) for n in cdi],
                    driver_name=driver,
                    pool_name=d.pool,
                    device_name=d.device,
                )
                if d.share_id is not None:
                    r.share_id = d.share_id
                resources.append(r)
        out.append(
            podresources_pb2.DynamicResource(
                claim_name=claim.name, claim_namespace=namespace, claim_resources=resources
            )
        )
    return out


class _Servicer(podresources_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, server: PodResourcesServer) -> None:
        self.server = server

    def _pod(self, pod: Pod) -> podresources_pb2.PodResources:
        return podresources_pb2.PodResources(
            name=pod.name,
            namespace=pod.namespace,
            containers=[
                podresources_pb2.ContainerResources(
                    name=c.name,
                    devices=_groups(c.devices, self.server.grouping),
                    cpu_ids=c.cpu_ids,
                    dynamic_resources=_dynamic(c.claims, pod.namespace),
                )
                for c in pod.containers
            ],
        )

    def List(self, request, context):  # noqa: N802 (gRPC method name)
        with self.server.lock:
            self.server.calls.append("List")
            return podresources_pb2.ListPodResourcesResponse(
                pod_resources=[self._pod(p) for p in self.server.pods]
            )

    def Get(self, request, context):  # noqa: N802
        with self.server.lock:
            self.server.calls.append("Get")
            if not self.server.get_enabled:
                context.abort(grpc.StatusCode.UNKNOWN, "PodResources API Get method disabled")
            for pod in self.server.pods:
                if pod.name == request.pod_name and pod.namespace == request.pod_namespace:
                    return podresources_pb2.GetPodResourcesResponse(pod_resources=self._pod(pod))
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )

    def GetAllocatableResources(self, request, context):  # noqa: N802
        with self.server.lock:
            self.server.calls.append("GetAllocatableResources")
            return podresources_pb2.AllocatableResourcesResponse(
                devices=_groups(self.server.allocatable, "device")
            )


class PodResourcesServer:
    """Serves pod-resources v1 on `socket_path` while started (use as a context manager)."""

    def __init__(
        self,
        socket_path: str,
        pods: Optional[List[Pod]] = None,
        allocatable: Optional[Devices] = None,
        *,
        grouping: str = "device",
        get_enabled: bool = True,
    ) -> None:
        if grouping not in ("device", "numa"):
            raise ValueError(f"grouping {grouping!r}, expected 'device' or 'numa'")
        self.socket_path = socket_path
        self.pods: List[Pod] = list(pods or [])
        self.allocatable: Devices = dict(allocatable or {})
        self.grouping = grouping
        self.get_enabled = get_enabled
        self.calls: List[str] = []
        self.lock = threading.Lock()
        self._server: Optional[grpc.Server] = None

    def start(self) -> PodResourcesServer:
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        server.add_insecure_port("unix://" + os.path.abspath(self.socket_path))
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> PodResourcesServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _env_name(resource: str) -> str:
    # The SR-IOV device plugin's convention: PCIDEVICE_<PREFIX>_<NAME>, non-alphanumerics to _.
    return "PCIDEVICE_" + re.sub(r"[^A-Za-z0-9]", "_", resource).upper()


def checkpoint_json(
    pods: List[Pod],
    registered: Devices,
    *,
    flat: bool = False,
    checksum: int = 1234567890,
) -> str:
    """The kubelet's device-manager checkpoint holding `pods`' allocations.

    `flat=True` writes Kubernetes <= 1.19's format (DeviceIDs as a list). The checksum is a
    placeholder: the kubelet's is a Go-specific hash, and virtdp never verifies it.
    """
    entries = []
    for pod in pods:
        for c in pod.containers:
            for resource, by_numa in sorted(c.devices.items()):
                all_ids = [i for _, ids in sorted(by_numa.items()) for i in ids]
                resp = deviceplugin_pb2.ContainerAllocateResponse(
                    envs={_env_name(resource): ",".join(all_ids)}
                )
                entries.append(
                    {
                        "PodUID": pod.uid,
                        "ContainerName": c.name,
                        "ResourceName": resource,
                        "DeviceIDs": (
                            all_ids if flat else {str(n): ids for n, ids in sorted(by_numa.items())}
                        ),
                        "AllocResp": base64.b64encode(resp.SerializeToString()).decode(),
                    }
                )
    reg = {
        resource: [i for _, ids in sorted(by_numa.items()) for i in ids]
        for resource, by_numa in registered.items()
    }
    return json.dumps(
        {
            "Data": {"PodDeviceEntries": entries or None, "RegisteredDevices": reg or None},
            "Checksum": checksum,
        }
    )
