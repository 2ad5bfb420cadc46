"""Allocation rules of the device plugin: request validation, preferred allocation, env names.

Pure functions over plain data, so the servicer stays a thin translation of gRPC to these.
Errors are AllocationError with the gRPC status the servicer should answer
(INVALID_ARGUMENT for a malformed or inconsistent request, FAILED_PRECONDITION for a request
that was fine but no longer fits the devices' state).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import grpc

HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"


@dataclass(frozen=True)
class DeviceView:
    """What the servicer knows about one device of its pool."""

    id: str  # the PCI address
    healthy: bool
    numa_node: Optional[int]  # None when unknown (the kernel's -1 is stored as None)


class AllocationError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def env_name(resource_name: str) -> str:
    """`PCIDEVICE_<PREFIX>_<NAME>`: upper case, every non-alphanumeric character to `_`."""
    return "PCIDEVICE_" + re.sub(r"[^A-Z0-9]", "_", resource_name.upper())


def _invalid(message: str) -> AllocationError:
    return AllocationError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_ids(
    ids: Sequence[str],
    resource_name: str,
    devices: Mapping[str, DeviceView],
    owner_of: Mapping[str, str],
    *,
    what: str,
) -> None:
    """Every ID must be a device of this pool, listed once."""
    seen = set()
    for dev_id in ids:
        if dev_id in seen:
            raise _invalid(f"{what}: device ID {dev_id!r} is listed twice")
        seen.add(dev_id)
        if dev_id in devices:
            continue
        other = owner_of.get(dev_id)
        if other is not None:
            raise _invalid(
                f"{what}: device {dev_id!r} belongs to resource {other}, not {resource_name}"
            )
        raise _invalid(
            f"{what}: unknown device ID {dev_id!r} for resource {resource_name} "
            f"(expected one of the PCI addresses this plugin advertises)"
        )


def check_allocate(
    requests: Sequence[Sequence[str]],
    resource_name: str,
    devices: Mapping[str, DeviceView],
    owner_of: Mapping[str, str],
) -> List[List[str]]:
    """Validate every container request of an AllocateRequest; returns sorted ID lists."""
    if not requests:
        raise _invalid("AllocateRequest has no container_requests, expected one per container")
    out = []
    for i, ids in enumerate(requests):
        what = f"container_requests[{i}]"
        if not ids:
            raise _invalid(f"{what}: devices_ids is empty, expected at least one device ID")
        check_ids(ids, resource_name, devices, owner_of, what=what)
        for dev_id in ids:
            if not devices[dev_id].healthy:
                raise AllocationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{what}: device {dev_id} of {resource_name} is Unhealthy and cannot be "
                    "allocated",
                )
        out.append(sorted(ids))
    return out


def _duplicates(ids: Sequence[str], what: str) -> None:
    seen = set()
    for dev_id in ids:
        if dev_id in seen:
            raise _invalid(f"{what}: device ID {dev_id!r} is listed twice")
        seen.add(dev_id)


def preferred(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    resource_name: str,
    devices: Mapping[str, DeviceView],
    owner_of: Mapping[str, str],
    *,
    what: str = "container_requests[0]",
) -> Tuple[List[str], List[str]]:
    """(IDs to allocate, IDs ignored): all of `must_include`, then NICs of one NUMA node, then
    stable order; `size` of them, or every usable one when fewer are left.

    IDs that are not devices of this pool (unknown, or another pool's: the kubelet's list can be
    a moment behind the inventory) are ignored, not refused: the kubelet fails the pod's
    admission on any error from this call, and Allocate checks the final choice anyway. A
    request inconsistent on its face (size below 1, must-include IDs missing from available or
    more of them than `size`, an ID twice, `size` above the IDs sent) is INVALID_ARGUMENT.

    Nodes are taken in this order: the node(s) of the must-include devices; nodes that can hold
    all remaining devices, fewest spare first (best fit, real NUMA nodes before devices with no
    node); then the others, most free devices first. Within a node: healthy before unhealthy,
    then by PCI address.
    """
    del owner_of  # foreign IDs are ignored like unknown ones
    if size <= 0:
        raise _invalid(f"{what}: allocation_size is {size}, expected 1 or more")
    _duplicates(available, f"{what}: available_deviceIDs")
    _duplicates(must_include, f"{what}: must_include_deviceIDs")
    missing = [d for d in must_include if d not in set(available)]
    if missing:
        raise _invalid(
            f"{what}: must_include_deviceIDs {missing} are not in available_deviceIDs, "
            "expected a subset of them"
        )
    if len(must_include) > size:
        raise _invalid(
            f"{what}: {len(must_include)} must_include_deviceIDs but allocation_size is {size}, "
            "expected at most allocation_size"
        )
    if size > len(available):
        raise _invalid(
            f"{what}: allocation_size {size} is larger than the {len(available)} available "
            "devices"
        )
    ignored = [d for d in available if d not in devices]
    available = [d for d in available if d in devices]
    must_include = [d for d in must_include if d in devices]
    size = min(size, len(available))
    if size == 0:
        return [], ignored

    chosen = sorted(must_include)
    need = size - len(chosen)
    if need == 0:
        return chosen, ignored
    taken = set(chosen)
    by_node: Dict[Optional[int], List[str]] = defaultdict(list)
    for dev_id in available:
        if dev_id not in taken:
            by_node[devices[dev_id].numa_node].append(dev_id)
    for ids in by_node.values():
        ids.sort(key=lambda d: (not devices[d].healthy, d))

    must_nodes: Dict[int, int] = defaultdict(int)
    for dev_id in must_include:
        node = devices[dev_id].numa_node
        if node is not None:
            must_nodes[node] += 1

    def rank(node: Optional[int]) -> Tuple[int, int, int, int]:
        count = len(by_node[node])
        fits = count >= need
        return (
            0 if node is not None and node in must_nodes else 1,
            0 if fits else 1,
            0 if node is not None else 1,
            count - need if fits else -count,
        )

    order = sorted(by_node, key=lambda n: rank(n) + ((n if n is not None else 0),))
    for node in order:
        for dev_id in by_node[node]:
            if need == 0:
                break
            chosen.append(dev_id)
            need -= 1
    return chosen, ignored
