"""What the device plugins on this node advertise, seen as the kubelet sees it: dial each plugin
socket in the device-plugins directory, call GetDevicePluginOptions, read the first
ListAndWatch message. Works with any plugin that speaks v1beta1, not only virtdp-serve.

A plugin socket does not say which resource it serves (that went to the kubelet in Register), so
the resource is found from the kubelet's own records: the device IDs it lists as allocatable
(pod-resources GetAllocatableResources), else its checkpoint's registered devices.
"""

from __future__ import annotations

import os
import stat
from concurrent import futures
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import grpc

from virtcore import checkpoint
from virtcore.kubelet import (
    channel,
    deviceplugin_pb2,
    deviceplugin_pb2_grpc,
    podresources,
    registration,
)

DEFAULT_DIR = registration.DEFAULT_DEVICE_PLUGIN_DIR
KUBELET_SOCKET = registration.KUBELET_SOCKET_NAME
CHECKPOINT_NAME = registration.CHECKPOINT_NAME

OK, FAILED, SKIPPED = "ok", "error", "skipped"


@dataclass(frozen=True)
class Device:
    id: str
    health: str
    numa_nodes: Tuple[int, ...]


@dataclass(frozen=True)
class Plugin:
    socket: str
    status: str  # OK, FAILED (socket did not answer as a plugin), SKIPPED (not a socket)
    error: Optional[str] = None
    pre_start_required: Optional[bool] = None
    get_preferred_allocation_available: Optional[bool] = None
    devices: Tuple[Device, ...] = ()
    resource: Optional[str] = None
    resource_from: Optional[str] = None  # "pod-resources" or "checkpoint"


def entries(directory: str) -> List[str]:
    """Paths the kubelet could dial: every entry but its own socket and checkpoint."""
    names = os.listdir(directory)  # OSError is the caller's to report
    skip = {KUBELET_SOCKET, CHECKPOINT_NAME}
    return [os.path.join(directory, n) for n in sorted(names) if n not in skip]


def dial(path: str, timeout: float) -> Plugin:
    try:
        st = os.lstat(path)
    except OSError as e:
        return Plugin(path, FAILED, f"{path}: {e.strerror or e}")
    if not stat.S_ISSOCK(st.st_mode):
        return Plugin(path, SKIPPED, f"{path}: not a socket")
    try:
        channel.probe(path, timeout)
    except channel.SocketUnavailable as e:
        return Plugin(path, FAILED, str(e))
    ch = channel.unix_channel(path)
    try:
        stub = deviceplugin_pb2_grpc.DevicePluginStub(ch)
        method = "GetDevicePluginOptions"
        try:
            opts = stub.GetDevicePluginOptions(deviceplugin_pb2.Empty(), timeout=timeout)
            method = "ListAndWatch"
            stream = stub.ListAndWatch(deviceplugin_pb2.Empty(), timeout=timeout)
            try:
                first = next(stream)
            except StopIteration:
                return Plugin(
                    path, FAILED, f"{path}: ListAndWatch ended without sending a device list"
                )
            finally:
                stream.cancel()
        except grpc.RpcError as e:
            return Plugin(path, FAILED, _rpc_error(path, method, e, timeout))
    finally:
        ch.close()
    devices = tuple(
        Device(
            id=d.ID,
            health=d.health,
            numa_nodes=tuple(n.ID for n in d.topology.nodes) if d.HasField("topology") else (),
        )
        for d in first.devices
    )
    return Plugin(
        path,
        OK,
        pre_start_required=opts.pre_start_required,
        get_preferred_allocation_available=opts.get_preferred_allocation_available,
        devices=devices,
    )


def _rpc_error(path: str, method: str, e: grpc.RpcError, timeout: float) -> str:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{path}: {method}: no answer within {timeout:g}s (plugin hung?)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"{path}: {method}: not implemented: this socket does not serve the v1beta1 "
            "DevicePlugin API"
        )
    return f"{path}: {method}: {code.name}: {details}"


def kubelet_resources(
    socket_path: str, checkpoint_path: str, timeout: float
) -> Tuple[Dict[str, List[str]], Optional[str], List[str]]:
    """Resource name -> device IDs as the kubelet knows them, where from, and why not."""
    notes: List[str] = []
    try:
        with podresources.Client(socket_path, timeout=timeout) as client:
            alloc = client.allocatable()
        by_res: Dict[str, List[str]] = {}
        for group in alloc.devices:
            by_res.setdefault(group.resource_name, []).extend(group.device_ids)
        return by_res, "pod-resources", notes
    except podresources.PodResourcesError as e:
        notes.append(str(e))
    try:
        ck = checkpoint.load(checkpoint_path)
        return {r: list(ids) for r, ids in ck.registered_devices}, "checkpoint", notes
    except checkpoint.CheckpointError as e:
        notes.append(str(e))
    return {}, None, notes


def name_resources(
    plugins: Sequence[Plugin], known: Dict[str, List[str]], source: Optional[str]
) -> List[Plugin]:
    """Each plugin with the resource whose kubelet-known IDs overlap its devices most."""
    from dataclasses import replace

    out = []
    for p in plugins:
        ids = {d.id for d in p.devices}
        best, score = None, 0
        for resource, rids in sorted(known.items()):
            overlap = len(ids & set(rids))
            if overlap > score:
                best, score = resource, overlap
        out.append(replace(p, resource=best, resource_from=source if best else None))
    return out


def inspect(directory: str, timeout: float) -> List[Plugin]:
    """Dial every plugin socket at once: a hung one costs one timeout, not one each."""
    paths = entries(directory)
    if not paths:
        return []
    with futures.ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return list(pool.map(lambda p: dial(p, timeout), paths))
