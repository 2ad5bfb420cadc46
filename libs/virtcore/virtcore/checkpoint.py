"""Reading the kubelet's device-manager checkpoint (`kubelet_internal_checkpoint`), read-only.

The kubelet writes this JSON file in its device-plugins directory:

    {"Data": {"PodDeviceEntries": [{"PodUID", "ContainerName", "ResourceName",
                                     "DeviceIDs", "AllocResp"}],
              "RegisteredDevices": {"<resource>": ["<id>", ...]}},
     "Checksum": <uint>}

`DeviceIDs` is an object keyed by NUMA node ("-1" when the device has no topology) since
Kubernetes 1.20, and a flat list of IDs in 1.19 and older; both are read. `AllocResp` is the
base64 `ContainerAllocateResponse` protobuf the plugin returned. Go encodes empty slices and maps
as `null`, so every list and map may be null. The checksum is a Go-specific hash: this module
never verifies or writes the file (the kubelet would reject a file it did not hash itself).

Everything that can be wrong with the file is a CheckpointError whose message names the file,
the key path and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

DEFAULT_PATH = "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint"

FORMAT_NUMA = "numa"  # DeviceIDs keyed by NUMA node (Kubernetes 1.20+)
FORMAT_FLAT = "flat"  # DeviceIDs as a plain list (Kubernetes 1.19 and older)

# Far larger than any real checkpoint; a bigger file is not one.
_MAX_BYTES = 64 * 1024 * 1024


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable or not in either kubelet format."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        self.source = source
        self.key_path = key_path
        where = f"{source}: {key_path}: " if key_path else f"{source}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class DeviceID:
    id: str
    numa_node: Optional[int]  # None in the flat format; -1 = no topology


@dataclass(frozen=True)
class Entry:
    """One container's allocation of one resource."""

    pod_uid: str
    container_name: str
    resource_name: str
    devices: Tuple[DeviceID, ...]
    envs: Tuple[Tuple[str, str], ...] = ()  # from AllocResp, sorted by name
    annotations: Tuple[Tuple[str, str], ...] = ()
    alloc_problem: Optional[str] = None  # AllocResp present but not decodable

    @property
    def device_ids(self) -> Tuple[str, ...]:
        return tuple(d.id for d in self.devices)


@dataclass(frozen=True)
class Checkpoint:
    source: str
    format: Optional[str]  # FORMAT_NUMA, FORMAT_FLAT, or None when no entry tells
    entries: Tuple[Entry, ...]
    registered_devices: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (resource, ids), sorted
    checksum: Optional[int]

    def registered(self, resource: str) -> Tuple[str, ...]:
        return dict(self.registered_devices).get(resource, ())


def load(path: str = DEFAULT_PATH) -> Checkpoint:
    """Read and parse the checkpoint at `path` (never writes it)."""
    if not os.path.lexists(path):
        raise CheckpointError(
            path, "", "no such file (is the kubelet's device manager running on this node?)"
        )
    if os.path.isdir(path):
        raise CheckpointError(path, "", "is a directory, expected the checkpoint file")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(path, "", f"cannot read: {e.strerror or e}") from None
    if len(raw) > _MAX_BYTES:
        raise CheckpointError(path, "", f"larger than {_MAX_BYTES} bytes, not a checkpoint")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            path, "", f"not UTF-8 text (byte {e.start}), expected kubelet checkpoint JSON"
        ) from None
    return parse(text, path)


def parse(text: str, source: str) -> Checkpoint:
    if not text.strip():
        raise CheckpointError(
            source, "", "is empty, expected kubelet checkpoint JSON (truncated write?)"
        )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        body = text.strip()
        # A JSON object cut short: the parser stops at or before the end, the brace never closes.
        truncated = e.pos >= len(body) or (body.startswith("{") and not body.endswith("}"))
        hint = " (the file looks truncated)" if truncated else ""
        raise CheckpointError(
            source,
            "",
            f"not valid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}",
        ) from None
    if not isinstance(doc, dict):
        raise CheckpointError(
            source, "", f"top level is {_kind(doc)}, expected an object with Data and Checksum"
        )
    if "Data" not in doc:
        raise CheckpointError(source, "Data", "missing, expected an object with PodDeviceEntries")
    data = doc["Data"]
    if not isinstance(data, dict):
        raise CheckpointError(source, "Data", f"is {_kind(data)}, expected an object")

    checksum = doc.get("Checksum")
    if checksum is not None and (
        isinstance(checksum, bool) or not isinstance(checksum, int) or checksum < 0
    ):
        raise CheckpointError(
            source, "Checksum", f"is {_kind(checksum)}, expected an unsigned integer"
        )

    raw_entries = data.get("PodDeviceEntries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise CheckpointError(
            source, "Data.PodDeviceEntries", f"is {_kind(raw_entries)}, expected a list"
        )
    entries: List[Entry] = []
    formats = set()
    for i, raw in enumerate(raw_entries):
        entry, fmt = _entry(source, f"Data.PodDeviceEntries[{i}]", raw)
        entries.append(entry)
        if fmt:
            formats.add(fmt)
    if len(formats) > 1:
        raise CheckpointError(
            source,
            "Data.PodDeviceEntries",
            "mixes DeviceIDs keyed by NUMA node with flat lists, expected one format",
        )

    registered = data.get("RegisteredDevices")
    if registered is None:
        registered = {}
    if not isinstance(registered, dict):
        raise CheckpointError(
            source,
            "Data.RegisteredDevices",
            f"is {_kind(registered)}, expected an object of resource name to device IDs",
        )
    reg: List[Tuple[str, Tuple[str, ...]]] = []
    for resource, ids in sorted(registered.items()):
        reg.append((resource, _ids(source, f"Data.RegisteredDevices[{resource!r}]", ids)))

    return Checkpoint(
        source=source,
        format=formats.pop() if formats else None,
        entries=tuple(entries),
        registered_devices=tuple(reg),
        checksum=checksum,
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _string(source: str, key_path: str, obj: Dict[str, Any], key: str) -> str:
    if key not in obj:
        raise CheckpointError(source, f"{key_path}.{key}", "missing, expected a string")
    value = obj[key]
    if not isinstance(value, str):
        raise CheckpointError(source, f"{key_path}.{key}", f"is {_kind(value)}, expected a string")
    return value


def _ids(source: str, key_path: str, value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CheckpointError(source, key_path, f"is {_kind(value)}, expected a list of IDs")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise CheckpointError(
                source, f"{key_path}[{j}]", f"is {_kind(item)}, expected a device ID string"
            )
    return tuple(value)


def _entry(source: str, key_path: str, raw: Any) -> Tuple[Entry, Optional[str]]:
    if not isinstance(raw, dict):
        raise CheckpointError(source, key_path, f"is {_kind(raw)}, expected an object")
    pod_uid = _string(source, key_path, raw, "PodUID")
    container = _string(source, key_path, raw, "ContainerName")
    resource = _string(source, key_path, raw, "ResourceName")
    if "DeviceIDs" not in raw:
        raise CheckpointError(
            source,
            f"{key_path}.DeviceIDs",
            "missing, expected IDs keyed by NUMA node or a list of IDs",
        )
    raw_ids = raw["DeviceIDs"]
    fmt: Optional[str]
    devices: List[DeviceID] = []
    if raw_ids is None:
        fmt = None
    elif isinstance(raw_ids, list):
        fmt = FORMAT_FLAT
        devices = [DeviceID(i, None) for i in _ids(source, f"{key_path}.DeviceIDs", raw_ids)]
    elif isinstance(raw_ids, dict):
        fmt = FORMAT_NUMA
        for node_key in sorted(raw_ids, key=_numa_sort_key):
            try:
                node = int(node_key)
            except ValueError:
                raise CheckpointError(
                    source,
                    f"{key_path}.DeviceIDs[{node_key!r}]",
                    'key is not a NUMA node number, expected an integer such as "0" or "-1"',
                ) from None
            ids = _ids(source, f"{key_path}.DeviceIDs[{node_key!r}]", raw_ids[node_key])
            devices.extend(DeviceID(i, node) for i in ids)
    else:
        raise CheckpointError(
            source,
            f"{key_path}.DeviceIDs",
            f"is {_kind(raw_ids)}, expected IDs keyed by NUMA node or a list of IDs",
        )
    envs, annotations, problem = _alloc_resp(source, key_path, raw.get("AllocResp"))
    return (
        Entry(
            pod_uid=pod_uid,
            container_name=container,
            resource_name=resource,
            devices=tuple(devices),
            envs=envs,
            annotations=annotations,
            alloc_problem=problem,
        ),
        fmt,
    )


def _numa_sort_key(key: str) -> Tuple[int, str]:
    try:
        return (int(key), key)
    except ValueError:
        return (1 << 62, key)


def _alloc_resp(
    source: str, key_path: str, value: Any
) -> Tuple[Tuple[Tuple[str, str], ...], Tuple[Tuple[str, str], ...], Optional[str]]:
    """Envs and annotations of the stored ContainerAllocateResponse. A damaged AllocResp does not
    make the file unreadable for the kubelet's allocation bookkeeping, so it is a problem on the
    entry, not an error."""
    if value is None:
        return (), (), None
    if not isinstance(value, str):
        raise CheckpointError(
            source, f"{key_path}.AllocResp", f"is {_kind(value)}, expected a base64 string"
        )
    try:
        blob = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return (), (), "AllocResp is not valid base64"
    # Imported here: reading the entries themselves needs no protobuf.
    from google.protobuf.message import DecodeError

    from virtcore.kubelet import deviceplugin_pb2

    resp = deviceplugin_pb2.ContainerAllocateResponse()
    try:
        resp.ParseFromString(blob)
    except DecodeError:
        return (), (), "AllocResp is not a ContainerAllocateResponse protobuf"
    return tuple(sorted(resp.envs.items())), tuple(sorted(resp.annotations.items())), None
