"""Which pod and container holds which device: from the kubelet's pod-resources API, or from
its checkpoint file when the API does not answer, joined with where each NIC is now.

The API also lists DRA devices (a container's ResourceClaims, one row per device: `resource` is
the driver, `device_id` the DRA device name, `claim` the claim); a device named from a PCI
address the way virtdp names them (`pci-0000-00-04-0`) is placed like any NIC. The device
manager's checkpoint knows no DRA devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from virtcore import checkpoint, claims, pci
from virtcore.kubelet import podresources
from virtdp_inspect.locate import ABSENT, Locator, Place

SOURCE_API = "pod-resources"
SOURCE_CHECKPOINT = "checkpoint"


class NoSource(RuntimeError):
    """Neither the pod-resources API nor the checkpoint could be read."""


@dataclass(frozen=True)
class Allocation:
    """One device held by one container, as the kubelet reports it."""

    namespace: Optional[str]  # from the API; the checkpoint only knows the pod UID
    pod: Optional[str]
    pod_uid: Optional[str]  # from the checkpoint; the API does not give it
    container: str
    resource: str
    device_id: str
    kubelet_numa_node: Optional[int]  # the NUMA node the kubelet recorded; None = none
    claim: Optional[str] = None  # DRA: "<namespace>/<name>" of the ResourceClaim
    pool: Optional[str] = None  # DRA: the device's pool

    @property
    def pci_address(self) -> Optional[str]:
        if self.claim is not None:
            return claims.pci_address_of(self.device_id)
        return pci.normalize(self.device_id) if pci.is_pci_address(self.device_id) else None


@dataclass(frozen=True)
class Source:
    name: str  # SOURCE_API or SOURCE_CHECKPOINT
    path: str  # the socket or file that answered
    fallback_reason: Optional[str]  # why the API was not used (None when it was)
    allocations: Tuple[Allocation, ...]


def from_api(socket_path: str, timeout: float) -> List[Allocation]:
    out = []
    with podresources.Client(socket_path, timeout=timeout) as client:
        pods = client.list()
    for pod in pods:
        for c in pod.containers:
            for group in c.devices:
                numa = group.numa_nodes[0] if group.numa_nodes else None
                for dev_id in group.device_ids:
                    out.append(
                        Allocation(
                            namespace=pod.namespace,
                            pod=pod.name,
                            pod_uid=None,
                            container=c.name,
                            resource=group.resource_name,
                            device_id=dev_id,
                            kubelet_numa_node=numa,
                        )
                    )
            for claim in c.dynamic_resources:
                for r in claim.claim_resources:
                    out.append(
                        Allocation(
                            namespace=pod.namespace,
                            pod=pod.name,
                            pod_uid=None,
                            container=c.name,
                            resource=r.driver_name,
                            device_id=r.device_name,
                            kubelet_numa_node=None,
                            claim=f"{claim.claim_namespace}/{claim.claim_name}",
                            pool=r.pool_name,
                        )
                    )
    return out


def from_checkpoint(path: str) -> List[Allocation]:
    ck = checkpoint.load(path)
    out = []
    for e in ck.entries:
        for d in e.devices:
            numa = d.numa_node if d.numa_node is not None and d.numa_node >= 0 else None
            out.append(
                Allocation(None, None, e.pod_uid, e.container_name, e.resource_name, d.id, numa)
            )
    return out


def gather(socket_path: str, checkpoint_path: str, timeout: float) -> Source:
    """The API's answer, else the checkpoint's. A server that answers with an error status
    (e.g. List not implemented) also falls back: the checkpoint is the kubelet's own record."""
    try:
        allocs = from_api(socket_path, timeout)
        return Source(SOURCE_API, socket_path, None, tuple(_sorted(allocs)))
    except podresources.PodResourcesError as e:
        reason = str(e)
    try:
        allocs = from_checkpoint(checkpoint_path)
    except checkpoint.CheckpointError as e:
        raise NoSource(f"{reason}; and the checkpoint fallback failed: {e}") from None
    return Source(SOURCE_CHECKPOINT, checkpoint_path, reason, tuple(_sorted(allocs)))


def _sorted(allocs: Sequence[Allocation]) -> List[Allocation]:
    return sorted(
        allocs,
        key=lambda a: (
            a.namespace or "",
            a.pod or "",
            a.pod_uid or "",
            a.container,
            a.resource,
            a.device_id,
        ),
    )


def rows(source: Source, locator: Locator, resources: Sequence[str] = ()) -> List[dict]:
    """One row per allocation (only of `resources` when given), joined with its NIC's place."""
    out = []
    for a in source.allocations:
        if resources and a.resource not in resources:
            continue
        address = a.pci_address
        if a.claim is not None and address is None:
            place = Place(ABSENT, note="DRA device not named from a PCI address (not virtdp's)")
        else:
            place = locator.place(address or a.device_id)
        out.append(
            {
                "namespace": a.namespace,
                "pod": a.pod,
                "pod_uid": a.pod_uid,
                "container": a.container,
                "resource": a.resource,
                "device_id": a.device_id,
                "claim": a.claim,
                "pool": a.pool,
                "pci_address": address,
                "numa_node": place.numa_node,
                "kubelet_numa_node": a.kubelet_numa_node,
                "location": place.location,
                "netns": place.netns,
                "netns_path": place.netns_path,
                "ifname": place.ifname,
                "host_ifname": place.host_ifname,
                "note": place.note,
            }
        )
    return out
