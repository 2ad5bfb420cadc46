"""THE test API server: the kube-apiserver endpoints virtdp's DRA driver uses, with the real
server's semantics, over HTTP on loopback (threaded; one thread per connection).

Checked against Kubernetes 1.36 (openshift/microshift @ 8e16b12f, deps/github.com/openshift/
kubernetes): the types `staging/src/k8s.io/api/resource/v1/types.go`, validation
`pkg/apis/resource/validation/validation.go`, defaults `pkg/apis/resource/v1/defaults.go`, the
strategies `pkg/registry/resource/{resourceslice,resourceclaim}/strategy.go`, and apiserver's
generic registry, patch and watch handling (k8s.io/apiserver):

- Resources: resource.k8s.io/v1 `resourceslices` (cluster-scoped), `resourceclaims`
  (namespaced, `status` subresource), `deviceclasses` (cluster-scoped); v1 `nodes`.
- One resourceVersion counter for everything (etcd's revision), a string on the wire. Create
  sets uid, creationTimestamp, resourceVersion and, for slices, metadata.generation = 1; a slice
  update that changes the spec bumps generation. A taint without `timeAdded` gets the current
  time, as the v1 defaulting does (also on update: a driver that omits it changes the spec);
  times are stored as metav1.Time encodes them (UTC, whole seconds, "Z").
- Update (PUT) and patch: a resourceVersion in the body that is not the stored one -> 409
  Conflict; none -> unconditional (both strategies AllowUnconditionalUpdate). Create of an
  existing name -> 409 AlreadyExists; missing object -> 404 NotFound; invalid object -> 422
  Invalid with `details.causes` (field, reason, message); a body that is not JSON or of the wrong
  kind -> 400 BadRequest. `generateName` makes a name as SimpleNameGenerator does (base cut to
  58 characters, 5 random characters from "bcdfghjklmnpqrstvwxz2456789").
- Claims: a PUT to the main resource keeps the stored status; a PUT/PATCH to `/status` keeps
  the stored spec and metadata except labels, annotations, finalizers and ownerReferences
  (ResetObjectMetaForStatus keeps those from the old object too: only status changes). Each
  `status.devices[]` entry must name a device in `status.allocation.devices.results` and pass
  the networkData checks (interfaceName <= 256, hardwareAddress <= 128, ips canonical CIDRs,
  at most 16, unique).
- Patch content types: application/merge-patch+json (RFC 7386), application/json-patch+json
  (RFC 6902; a failed `test` -> 422), application/strategic-merge-patch+json (merge patch,
  except lists with a patchMergeKey in the Go types -- status.reservedFor and
  metadata.ownerReferences by uid -- which merge by key and honour `$patch: delete`;
  `$patch: replace` on a map). Apply patches -> 415, as for a server without the type.
- List: fieldSelector (`=`, `==`, `!=`; slices: metadata.name, spec.nodeName, spec.driver;
  others: metadata.name, metadata.namespace), labelSelector (equality forms),
  metadata.resourceVersion = the current revision; items carry no kind/apiVersion.
- deletecollection: DELETE on the collection with the same selectors; answers the deleted list.
- Watch (`watch=true`): resourceVersion unset or "0" starts with ADDED for every matching object
  then streams changes; resourceVersion N streams the events after N, or -- when N is older
  than the retained history (`compact()`) -- answers 200 with one ERROR event carrying a
  410 Expired Status, as the watch cache does. `allowWatchBookmarks=true` adds BOOKMARK events
  (an object of the kind with only metadata.resourceVersion) every `bookmark_interval` seconds
  and one as `timeoutSeconds` ends the stream, as the watch cache does once it has seen a
  revision of the resource (a 1.36.2 server whose cache had seen none sent no bookmark in a
  90 s watch: `bookmarks = False` models that; clients must not rely on them). A watch ends on
  timeout, when the server stops or goes down; events are newline-delimited JSON in chunked
  encoding. The 410 body is the real one (checked against 1.36.2: "too old resource version:
  1 (339)", reason Expired).
- `netns=PATH` listens on 127.0.0.1 inside that network namespace (a daemon under test that
  runs there reaches it; the socket is made by a throwaway thread that enters the namespace).
- Faults: `down()` closes the listening socket and every open connection (clients get
  connection refused) until `up()` listens again on the same port; `slow = s` delays every
  answer by s seconds; `conflict_next(resource, name)` has an outside writer change the object
  (a label) just before the next write to it arrives, so that write meets a genuine 409;
  `bookmarks = False` ignores allowWatchBookmarks (which servers may do), so a watch that
  ends leaves the client with the version of its last event.
- `gates["DRADeviceTaints"] = False` drops device taints from slices that had none, as a
  1.34/1.35 server does by default.
- Not modelled: authentication/authorization (any request is allowed), server-side apply,
  managedFields, finalizers and graceful deletion, sendInitialEvents, resourceVersionMatch,
  paging (limit/continue), protobuf and CBOR. Unknown fields are dropped with a `Warning`
  header, as fieldValidation=Warn does; `unknown_fields` records them so tests can assert none.

Runs in the test process; the driver under test may be another process.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import datetime
import ipaddress
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

Obj = Dict[str, Any]

# -- validation helpers (k8s.io/apimachinery/pkg/util/validation) ------------------------------
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(-(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*)?"
    r"(\+[0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*)?"
)
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_REJECTED = "the server rejected our request due to an error in our request"

MAX_DEVICES = 128  # ResourceSliceMaxDevices
MAX_DEVICES_ADVANCED = 64  # ResourceSliceMaxDevicesWithAdvancedFeatures (taints, counters, lists)
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_TAINTS = 16
MAX_ATTRIBUTE_STRING = 64
TAINT_EFFECTS = ("NoExecute", "NoSchedule", "None")


@dataclass(frozen=True)
class Cause:
    field: str
    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueDuplicate, ...
    message: str


def _invalid(path: str, value: Any, detail: str) -> Cause:
    shown = json.dumps(value) if not isinstance(value, str) else f'"{value}"'
    return Cause(path, "FieldValueInvalid", f"{path}: Invalid value: {shown}: {detail}")


def _required(path: str, detail: str = "") -> Cause:
    return Cause(
        path, "FieldValueRequired", f"{path}: Required value" + (f": {detail}" if detail else "")
    )


def _too_long(path: str, limit: int) -> Cause:
    return Cause(path, "FieldValueTooLong", f"{path}: Too long: may not be more than {limit} bytes")


def _dns_label(path: str, value: str) -> List[Cause]:
    out = []
    if len(value) > 63:
        out.append(_invalid(path, value, "must be no more than 63 characters"))
    if not _DNS1123_LABEL.fullmatch(value):
        out.append(
            _invalid(
                path,
                value,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
                "or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  "
                "or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
            )
        )
    return out


def _dns_subdomain(path: str, value: str) -> List[Cause]:
    out = []
    if len(value) > 253:
        out.append(_invalid(path, value, "must be no more than 253 characters"))
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        out.append(
            _invalid(
                path,
                value,
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        )
    return out


def _driver_name(path: str, value: Any) -> List[Cause]:
    """corevalidation.ValidateCSIDriverName."""
    if not isinstance(value, str) or not value:
        return [_required(path)]
    out = [_too_long(path, 63)] if len(value) > 63 else []
    return out + _dns_subdomain(path, value.lower())


def _pool_name(path: str, value: Any) -> List[Cause]:
    if not isinstance(value, str) or not value:
        return [_required(path)]
    out = [_too_long(path, 253)] if len(value) > 253 else []
    for part in value.split("/"):
        out += _dns_subdomain(path, part)
    return out


def _qualified_attribute(path: str, name: str) -> List[Cause]:
    """validateQualifiedName: C identifier (<= 32), optionally after `<driver name>/`."""
    parts = name.split("/")
    out: List[Cause] = []
    ident = parts[-1]
    if len(parts) == 2:
        if not parts[0]:
            out.append(_invalid(path, "", "the domain must not be empty"))
        else:
            out += _driver_name(path, parts[0])
        if not parts[1]:
            out.append(_invalid(path, "", "the name must not be empty"))
            return out
    if len(ident) > 32:
        out.append(_too_long(path, 32))
    if not _C_IDENTIFIER.fullmatch(ident):
        out.append(
            _invalid(
                path,
                ident,
                "a valid C identifier must start with alphabetic character or '_', followed by "
                "a string of alphanumeric characters or '_'",
            )
        )
    return out


def _label_name(path: str, value: Any) -> List[Cause]:
    """metav1validation.ValidateLabelName (IsQualifiedName)."""
    if not isinstance(value, str) or not value:
        return [_required(path)]
    parts = value.split("/")
    ok = len(parts) <= 2
    if ok and len(parts) == 2:
        ok = (
            bool(parts[0]) and len(parts[0]) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(parts[0]))
        )
    name = parts[-1]
    ok = ok and 0 < len(name) <= 63 and bool(_QUALIFIED_NAME_PART.fullmatch(name))
    if ok:
        return []
    return [
        _invalid(
            path,
            value,
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character, with an optional DNS subdomain prefix and '/'",
        )
    ]


def _canonical_ifaddr(value: str) -> Optional[str]:
    """IsValidInterfaceAddress: None when `value` is a canonical ifaddr CIDR, else the message."""
    try:
        if "/" not in value:
            raise ValueError(value)
        iface = ipaddress.ip_interface(value)
    except ValueError:
        return "must be a valid address in CIDR form, (e.g. 10.9.8.7/24 or 2001:db8::1/64)"
    canonical = f"{iface.ip}/{iface.network.prefixlen}"
    if canonical != value:
        return f'must be in canonical form ("{canonical}")'
    return None


# -- known fields (what the server keeps; anything else is dropped with a warning) -----------
_META_FIELDS = {
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
}
_KNOWN: Dict[str, Set[str]] = {
    "ResourceSlice": {"apiVersion", "kind", "metadata", "spec"},
    "ResourceSlice.spec": {
        "driver",
        "pool",
        "nodeName",
        "nodeSelector",
        "allNodes",
        "devices",
        "perDeviceNodeSelection",
        "sharedCounters",
    },
    "ResourceSlice.spec.pool": {"name", "generation", "resourceSliceCount"},
    "Device": {
        "name",
        "attributes",
        "capacity",
        "consumesCounters",
        "nodeName",
        "nodeSelector",
        "allNodes",
        "taints",
        "bindsToNode",
        "bindingConditions",
        "bindingFailureConditions",
        "allowMultipleAllocations",
        "nodeAllocatableResourceMappings",
    },
    "DeviceAttribute": {"int", "bool", "string", "version", "ints", "bools", "strings", "versions"},
    "DeviceTaint": {"key", "value", "effect", "timeAdded"},
    "AllocatedDeviceStatus": {
        "driver",
        "pool",
        "device",
        "shareID",
        "conditions",
        "data",
        "networkData",
    },
    "NetworkDeviceData": {"interfaceName", "ips", "hardwareAddress"},
}


def _unknown(obj: Any, kind: str, path: str, out: List[str]) -> None:
    if isinstance(obj, dict):
        for key in list(obj):
            if key not in _KNOWN[kind]:
                out.append(f"{path}.{key}" if path else key)
                del obj[key]


def _prune_slice(obj: Obj) -> List[str]:
    dropped: List[str] = []
    _unknown(obj, "ResourceSlice", "", dropped)
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        for key in list(meta):
            if key not in _META_FIELDS:
                dropped.append(f"metadata.{key}")
                del meta[key]
    spec = obj.get("spec")
    if isinstance(spec, dict):
        _unknown(spec, "ResourceSlice.spec", "spec", dropped)
        _unknown(spec.get("pool"), "ResourceSlice.spec.pool", "spec.pool", dropped)
        for i, dev in enumerate(spec.get("devices") or []):
            p = f"spec.devices[{i}]"
            _unknown(dev, "Device", p, dropped)
            if isinstance(dev, dict):
                for name, attr in (dev.get("attributes") or {}).items():
                    _unknown(attr, "DeviceAttribute", f"{p}.attributes[{name}]", dropped)
                for j, taint in enumerate(dev.get("taints") or []):
                    _unknown(taint, "DeviceTaint", f"{p}.taints[{j}]", dropped)
    return dropped


def _prune_claim_status(obj: Obj) -> List[str]:
    dropped: List[str] = []
    status = obj.get("status")
    if isinstance(status, dict):
        for i, dev in enumerate(status.get("devices") or []):
            p = f"status.devices[{i}]"
            _unknown(dev, "AllocatedDeviceStatus", p, dropped)
            if isinstance(dev, dict):
                _unknown(dev.get("networkData"), "NetworkDeviceData", f"{p}.networkData", dropped)
    return dropped


# -- validation of the kinds ----------------------------------------------------------------
def _validate_meta(obj: Obj, namespaced: bool) -> List[Cause]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [_required("metadata")]
    out: List[Cause] = []
    name = meta.get("name")
    if not name:
        out.append(_required("metadata.name", "name or generateName is required"))
    else:
        out += _dns_subdomain("metadata.name", str(name))
    if namespaced and not meta.get("namespace"):
        out.append(_required("metadata.namespace"))
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        p = f"metadata.ownerReferences[{i}]"
        for key in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, dict) or not ref.get(key):
                out.append(_required(f"{p}.{key}" if key != "uid" else p + ".uid"))
    for key, value in (meta.get("labels") or {}).items():
        out += _label_name("metadata.labels", key)
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            out.append(
                _invalid("metadata.labels", value, "a valid label must be 63 characters or less")
            )
    return out


def validate_slice(obj: Obj, old: Optional[Obj]) -> List[Cause]:
    """ValidateResourceSlice / ValidateResourceSliceUpdate."""
    out = _validate_meta(obj, namespaced=False)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return out + [_required("spec")]
    out += _driver_name("spec.driver", spec.get("driver"))
    pool = spec.get("pool")
    if not isinstance(pool, dict):
        out.append(_required("spec.pool.name"))
        pool = {}
    else:
        out += _pool_name("spec.pool.name", pool.get("name"))
    count = pool.get("resourceSliceCount", 0)
    if not isinstance(count, int) or count <= 0:
        out.append(_invalid("spec.pool.resourceSliceCount", count, "must be greater than zero"))
    generation = pool.get("generation", 0)
    if not isinstance(generation, int) or generation < 0:
        out.append(
            _invalid("spec.pool.generation", generation, "must be greater than or equal to zero")
        )
    if old is not None:
        old_spec = old["spec"]
        for label, new_v, old_v in (
            ("spec.pool.name", pool.get("name"), old_spec["pool"]["name"]),
            ("spec.driver", spec.get("driver"), old_spec["driver"]),
            ("spec.nodeName", spec.get("nodeName"), old_spec.get("nodeName")),
        ):
            if new_v != old_v:
                out.append(_invalid(label, new_v, "field is immutable"))
    chosen = []
    node = spec.get("nodeName")
    if node is not None:
        if node == "":
            out.append(
                _invalid("spec.nodeName", "", "must be either unset or set to a non-empty string")
            )
        else:
            chosen.append("`nodeName`")
            out += _dns_subdomain("spec.nodeName", str(node))
    if spec.get("nodeSelector") is not None:
        chosen.append("`nodeSelector`")
    for key in ("allNodes", "perDeviceNodeSelection"):
        if spec.get(key) is not None:
            if spec[key] is True:
                chosen.append(f"`{key}`")
            else:
                out.append(
                    _invalid(f"spec.{key}", spec[key], "must be either unset or set to true")
                )
    if not chosen:
        out.append(
            _required(
                "spec",
                "exactly one of `nodeName`, `nodeSelector`, `allNodes`, "
                "`perDeviceNodeSelection` is required",
            )
        )
    elif len(chosen) > 1:
        out.append(
            _invalid(
                "spec",
                "{" + ", ".join(chosen) + "}",
                "exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` "
                "is required, but multiple fields are set",
            )
        )
    devices = spec.get("devices") or []
    if not isinstance(devices, list):
        return out + [_invalid("spec.devices", devices, "must be a list")]
    advanced = any(
        isinstance(d, dict)
        and (d.get("taints") or d.get("consumesCounters") or _has_list_attributes(d))
        for d in devices
    )
    limit = MAX_DEVICES_ADVANCED if advanced else MAX_DEVICES
    if len(devices) > limit:
        out.append(
            Cause(
                "spec.devices",
                "FieldValueTooMany",
                f"spec.devices: Too many: {len(devices)}: must have at most {limit} items",
            )
        )
    seen: Set[str] = set()
    old_taints = {}
    if old is not None:
        old_taints = {
            d["name"]: d.get("taints") for d in old["spec"].get("devices") or [] if "name" in d
        }
    for i, dev in enumerate(devices):
        out += _validate_device(dev, f"spec.devices[{i}]", seen, old_taints)
    return out


def _has_list_attributes(dev: Obj) -> bool:
    return any(
        isinstance(a, dict) and any(k in a for k in ("ints", "bools", "strings", "versions"))
        for a in (dev.get("attributes") or {}).values()
    )


def _validate_device(dev: Any, p: str, seen: Set[str], old_taints: Dict[str, Any]) -> List[Cause]:
    if not isinstance(dev, dict):
        return [_invalid(p, dev, "must be an object")]
    out: List[Cause] = []
    name = dev.get("name")
    if not name:
        out.append(_required(p + ".name"))
    else:
        out += _dns_label(p + ".name", str(name))
        if name in seen:
            out.append(
                Cause(p + ".name", "FieldValueDuplicate", f'{p}.name: Duplicate value: "{name}"')
            )
        seen.add(str(name))
    attrs = dev.get("attributes") or {}
    capacity = dev.get("capacity") or {}
    if len(attrs) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
        out.append(
            _invalid(
                p,
                len(attrs) + len(capacity),
                "the total number of attributes and capacities must not exceed "
                f"{MAX_ATTRIBUTES_AND_CAPACITIES}",
            )
        )
    for key, attr in attrs.items():
        ap = f"{p}.attributes[{key}]"
        out += _qualified_attribute(f"{p}.attributes", key)
        if not isinstance(attr, dict):
            out.append(_invalid(ap, attr, "must be an object"))
            continue
        kinds = [k for k in _KNOWN["DeviceAttribute"] if k in attr]
        if len(kinds) != 1:
            out.append(
                _invalid(ap, "" if not kinds else attr, "exactly one value must be specified")
            )
        if "string" in attr:
            value = attr["string"]
            if not isinstance(value, str):
                out.append(_invalid(ap + ".string", value, "must be a string"))
            elif len(value) > MAX_ATTRIBUTE_STRING:
                out.append(_too_long(ap + ".string", MAX_ATTRIBUTE_STRING))
        if "int" in attr and (not isinstance(attr["int"], int) or isinstance(attr["int"], bool)):
            out.append(_invalid(ap + ".int", attr["int"], "must be an integer"))
        if "bool" in attr and not isinstance(attr["bool"], bool):
            out.append(_invalid(ap + ".bool", attr["bool"], "must be a boolean"))
        if "version" in attr and not (
            isinstance(attr["version"], str) and _SEMVER.fullmatch(attr["version"])
        ):
            out.append(
                _invalid(
                    ap + ".version",
                    attr["version"],
                    "must be a string compatible with semver.org spec 2.0.0",
                )
            )
    taints = dev.get("taints") or []
    if name in old_taints and old_taints[name] == taints:
        return out  # unchanged taints are not validated again
    if len(taints) > MAX_TAINTS:
        out.append(
            Cause(
                p + ".taints",
                "FieldValueTooMany",
                f"{p}.taints: Too many: {len(taints)}: must have at most {MAX_TAINTS} items",
            )
        )
    for j, taint in enumerate(taints):
        tp = f"{p}.taints[{j}]"
        if not isinstance(taint, dict):
            out.append(_invalid(tp, taint, "must be an object"))
            continue
        out += _label_name(tp + ".key", taint.get("key"))
        value = taint.get("value", "")
        if value and (len(value) > 63 or not _LABEL_VALUE.fullmatch(value)):
            out.append(
                _invalid(tp + ".value", value, "a valid label must be 63 characters or less")
            )
        effect = taint.get("effect", "")
        if not effect:
            out.append(_required(tp + ".effect"))
        elif effect not in TAINT_EFFECTS:
            out.append(
                Cause(
                    tp + ".effect",
                    "FieldValueNotSupported",
                    f'{tp}.effect: Unsupported value: "{effect}": supported values: '
                    + ", ".join(f'"{e}"' for e in TAINT_EFFECTS),
                )
            )
    return out


def validate_claim_status(obj: Obj, old: Obj) -> List[Cause]:
    """The parts of ValidateResourceClaimStatusUpdate a driver's status writes meet."""
    out: List[Cause] = []
    status = obj.get("status") or {}
    allocation = status.get("allocation")
    allocated = set()
    if allocation:
        for r in (allocation.get("devices") or {}).get("results") or []:
            allocated.add((r.get("driver"), r.get("pool"), r.get("device"), r.get("shareID")))
    old_alloc = (old.get("status") or {}).get("allocation")
    if old_alloc is not None and allocation is not None and old_alloc != allocation:
        out.append(_invalid("status.allocation", "", "field is immutable"))
    if status.get("reservedFor") and allocation is None:
        out.append(
            Cause(
                "status.reservedFor",
                "FieldValueForbidden",
                "status.reservedFor: Forbidden: may not be specified when `allocated` is not set",
            )
        )
    seen = set()
    for i, dev in enumerate(status.get("devices") or []):
        p = f"status.devices[{i}]"
        if not isinstance(dev, dict):
            out.append(_invalid(p, dev, "must be an object"))
            continue
        out += _driver_name(p + ".driver", dev.get("driver"))
        out += _pool_name(p + ".pool", dev.get("pool"))
        if not dev.get("device"):
            out.append(_required(p + ".device"))
        else:
            out += _dns_label(p + ".device", str(dev["device"]))
        key = (dev.get("driver"), dev.get("pool"), dev.get("device"), dev.get("shareID"))
        if key in seen:
            out.append(Cause(p, "FieldValueDuplicate", f"{p}: Duplicate value: {key}"))
        seen.add(key)
        if key not in allocated:
            shown = f"{key[0]}/{key[1]}/{key[2]}"
            out.append(_invalid(p, shown, "must be an allocated device in the claim"))
        net = dev.get("networkData")
        if net is None:
            continue
        if not isinstance(net, dict):
            out.append(_invalid(p + ".networkData", net, "must be an object"))
            continue
        if len(str(net.get("interfaceName", ""))) > 256:
            out.append(_too_long(p + ".networkData.interfaceName", 256))
        if len(str(net.get("hardwareAddress", ""))) > 128:
            out.append(_too_long(p + ".networkData.hardwareAddress", 128))
        ips = net.get("ips") or []
        if len(ips) > 16:
            out.append(
                Cause(
                    p + ".networkData.ips",
                    "FieldValueTooMany",
                    f"{p}.networkData.ips: Too many: {len(ips)}: must have at most 16 items",
                )
            )
        for j, address in enumerate(ips):
            problem = _canonical_ifaddr(str(address))
            if problem:
                out.append(_invalid(f"{p}.networkData.ips[{j}]", address, problem))
            if address in ips[:j]:
                out.append(
                    Cause(
                        f"{p}.networkData.ips[{j}]",
                        "FieldValueDuplicate",
                        f'{p}.networkData.ips[{j}]: Duplicate value: "{address}"',
                    )
                )
    return out


# -- patches --------------------------------------------------------------------------------
class PatchError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists whose Go type carries patchStrategy:"merge" (path -> merge key); all others replace.
_SMP_MERGE_KEYS: Dict[Tuple[str, ...], str] = {
    ("status", "reservedFor"): "uid",
    ("metadata", "ownerReferences"): "uid",
}


def strategic_merge_patch(target: Any, patch: Any, path: Tuple[str, ...] = ()) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key == "$retainKeys":
            continue
        if value is None:
            result.pop(key, None)
            continue
        sub = path + (key,)
        merge_key = _SMP_MERGE_KEYS.get(sub)
        if merge_key and isinstance(value, list):
            items = copy.deepcopy(result.get(key) or [])
            for item in value:
                if not isinstance(item, dict) or merge_key not in item:
                    raise PatchError(
                        400,
                        "BadRequest",
                        f"map: {item} does not contain declared merge key: {merge_key}",
                    )
                at = next(
                    (n for n, x in enumerate(items) if x.get(merge_key) == item[merge_key]), None
                )
                if item.get("$patch") == "delete":
                    if at is not None:
                        items.pop(at)
                elif at is None:
                    items.append({k: v for k, v in item.items() if k != "$patch"})
                else:
                    items[at] = strategic_merge_patch(items[at], item, sub)
            result[key] = items
        else:
            merged = strategic_merge_patch(result.get(key), value, sub)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _pointer(path: str) -> List[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(400, "BadRequest", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: List[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise KeyError(part)
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 (evanphx/json-patch as the apiserver uses it)."""
    if not isinstance(ops, list):
        raise PatchError(
            400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
        )
    doc = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op") if isinstance(op, dict) else None
        try:
            parts = _pointer(op.get("path", ""))
            if kind == "test":
                if _walk(doc, parts) != op.get("value"):
                    raise PatchError(
                        422,
                        "Invalid",
                        f"{_REJECTED}: testing value {op.get('path')} failed: test failed",
                    )
                continue
            if kind in ("move", "copy"):
                src = _pointer(op.get("from", ""))
                value = copy.deepcopy(_walk(doc, src))
                if kind == "move":
                    _remove(doc, src)
            elif kind in ("add", "replace"):
                value = copy.deepcopy(op.get("value"))
            elif kind == "remove":
                _remove(doc, parts)
                continue
            else:
                raise PatchError(400, "BadRequest", f"Unexpected kind: {kind}")
            if kind == "replace":
                _walk(doc, parts)  # must exist
                _remove(doc, parts)
            doc = _add(doc, parts, value)
        except KeyError as e:
            raise PatchError(
                422,
                "Invalid",
                f"{_REJECTED}: {kind} operation does not apply: "
                f"doc is missing path: {op.get('path')}: {e}",
            ) from None
    return doc


def _remove(doc: Any, parts: List[str]) -> None:
    parent = _walk(doc, parts[:-1])
    if isinstance(parent, list):
        parent.pop(int(parts[-1]))
    else:
        del parent[parts[-1]]


def _add(doc: Any, parts: List[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if index > len(parent):
            raise KeyError(last)
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise KeyError(last)
    return doc


# -- resources ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    resource: str  # plural, as in the URL
    group: str  # "" for core
    version: str
    kind: str
    namespaced: bool
    fields: Tuple[str, ...]  # selectable fields besides metadata.name / metadata.namespace
    status: bool  # has a status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource


KINDS = {
    k.resource: k
    for k in (
        Kind(
            "resourceslices",
            "resource.k8s.io",
            "v1",
            "ResourceSlice",
            False,
            ("spec.nodeName", "spec.driver"),
            False,
        ),
        Kind("resourceclaims", "resource.k8s.io", "v1", "ResourceClaim", True, (), True),
        Kind("deviceclasses", "resource.k8s.io", "v1", "DeviceClass", False, (), False),
        Kind("nodes", "", "v1", "Node", False, ("spec.unschedulable",), True),
    )
}


class ApiError(Exception):
    def __init__(
        self, status: int, reason: str, message: str, details: Optional[Obj] = None
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.details = status, reason, message, details

    def body(self) -> Obj:
        out: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.status,
        }
        if self.details is not None:
            out["details"] = self.details
        return out


def _not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{kind.qualified} "{name}" not found',
        {"name": name, "group": kind.group, "kind": kind.resource},
    )


def _conflict(kind: Kind, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {kind.qualified} "{name}": '
        "the object has been modified; "
        "please apply your changes to the latest version and try again",
        {"name": name, "group": kind.group, "kind": kind.resource},
    )


def _invalid_error(kind: Kind, name: str, causes: List[Cause]) -> ApiError:
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    return ApiError(
        422,
        "Invalid",
        f'{qualified} "{name}" is invalid: [' + ", ".join(c.message for c in causes) + "]",
        {
            "name": name,
            "group": kind.group,
            "kind": kind.kind,
            "causes": [
                {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
            ],
        },
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(value: Any) -> str:
    """A metav1.Time as the server stores and returns it: RFC 3339 in UTC, whole seconds."""
    try:
        t = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400,
            "BadRequest",
            f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": cannot parse',
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector(raw: str, what: str) -> List[Tuple[str, str, str]]:
    """`a=b,c!=d` -> [(a, "=", b), (c, "!=", d)]; only the equality forms the driver uses."""
    terms = []
    for term in filter(None, (t.strip() for t in raw.split(","))):
        m = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid {what} selector: {term!r}")
        terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return terms


def _field_value(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class _Event:
    rv: int
    type: str
    kind: Kind
    obj: Obj


class TestApiServer:
    """Start with `with TestApiServer() as api:`; `api.kubeconfig(path)` writes a kubeconfig."""

    __test__ = False  # not a pytest class

    def __init__(
        self, *, bookmark_interval: float = 60.0, history: int = 10000, netns: Optional[str] = None
    ) -> None:
        self.bookmark_interval = bookmark_interval
        self.netns = netns  # listen on 127.0.0.1 of this network namespace (a path)
        self.bookmarks = True  # False: ignore allowWatchBookmarks (servers may)
        # Feature gates that change what is stored (Kubernetes 1.36 defaults).
        self.gates = {"DRADeviceTaints": True}
        self.history = history
        self.slow = 0.0
        self.lock = threading.Condition()
        self.rv = 1
        self.objects: Dict[Tuple[str, str, str], Obj] = {}
        self.events: List[_Event] = []
        self.compacted = 0  # events with rv <= this are gone
        self.requests: List[Tuple[str, str, str]] = []  # (method, path, query)
        self.unknown_fields: List[str] = []
        self._conflicts: Dict[Tuple[str, str], int] = {}
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._connections: Set[socket.socket] = set()
        self._down = threading.Event()
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._listen()

    def _listen(self) -> None:
        outer = self

        class Handler(_Handler):
            api = outer

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up (or down()) is no error of the server

        server = Server(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        if self.netns is not None:
            server.socket.close()
            server.socket = _socket_in(self.netns)
        server.server_bind()
        server.server_activate()
        self._server = server
        self.port = server.server_address[1]
        self._down.clear()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="testapiserver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.down()

    def down(self) -> None:
        """Unreachable: stop listening and cut every open connection (watches included)."""
        server, self._server = self._server, None
        self._down.set()
        with self.lock:
            self.lock.notify_all()
        if server is not None:
            server.shutdown()
            server.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._listen()

    def __enter__(self) -> TestApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: str, *, token: str = "test-token") -> str:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        with open(path, "w") as f:
            json.dump(doc, f)  # JSON is YAML
        return path

    # -- faults and history --------------------------------------------------------------
    def compact(self) -> int:
        """Forget the event history up to now: older resourceVersions get 410 Gone."""
        with self.lock:
            self.compacted = self.rv
            self.events.clear()
            return self.rv

    def conflict_next(self, resource: str, name: str, count: int = 1) -> None:
        """The next `count` writes to `name` meet an outside change made just before them."""
        with self.lock:
            self._conflicts[(resource, name)] = count

    # -- direct access (tests) -------------------------------------------------------------
    def get(self, resource: str, name: str, namespace: str = "") -> Optional[Obj]:
        with self.lock:
            obj = self.objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def list(self, resource: str, namespace: Optional[str] = None) -> List[Obj]:
        with self.lock:
            return [
                copy.deepcopy(o)
                for (r, ns, _), o in sorted(self.objects.items())
                if r == resource and (namespace is None or ns == namespace)
            ]

    def create(self, resource: str, obj: Obj) -> Obj:
        kind = KINDS[resource]
        ns = (obj.get("metadata") or {}).get("namespace", "") if kind.namespaced else ""
        return self._create(kind, ns, copy.deepcopy(obj))

    def update(self, resource: str, obj: Obj, *, subresource: str = "") -> Obj:
        kind = KINDS[resource]
        meta = obj["metadata"]
        ns = meta.get("namespace", "") if kind.namespaced else ""
        return self._update(kind, ns, meta["name"], copy.deepcopy(obj), subresource)

    def delete(self, resource: str, name: str, namespace: str = "") -> Obj:
        return self._delete(KINDS[resource], namespace, name)

    def count(self, method: str, path_part: str, query_part: str = "") -> int:
        with self.lock:
            return sum(
                1 for m, p, q in self.requests if m == method and path_part in p and query_part in q
            )

    # -- storage ---------------------------------------------------------------------------
    def _record(self, etype: str, kind: Kind, obj: Obj) -> None:
        self.events.append(_Event(self.rv, etype, kind, copy.deepcopy(obj)))
        if len(self.events) > self.history:
            dropped = self.events[: len(self.events) - self.history]
            self.compacted = dropped[-1].rv
            del self.events[: len(dropped)]
        self.lock.notify_all()

    def _outside_change(self, kind: Kind, ns: str, name: str) -> None:
        key = (kind.resource, name)
        if self._conflicts.get(key, 0) <= 0:
            return
        self._conflicts[key] -= 1
        stored = self.objects.get((kind.resource, ns, name))
        if stored is None:
            return
        self.rv += 1
        labels = stored["metadata"].setdefault("labels", {})
        labels["test.virtdp/touched"] = str(self.rv)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self._record("MODIFIED", kind, stored)

    def _prepare(self, kind: Kind, obj: Obj, old: Optional[Obj] = None) -> None:
        if kind.resource == "resourceslices":
            self.unknown_fields += _prune_slice(obj)
            if not self.gates["DRADeviceTaints"] and not _uses_taints(old):
                # dropDisabledDRADeviceTaintsFields: off, and the old object has none.
                for dev in (obj.get("spec") or {}).get("devices") or []:
                    if isinstance(dev, dict):
                        dev.pop("taints", None)
            now = _now()
            for dev in (obj.get("spec") or {}).get("devices") or []:
                for taint in (dev.get("taints") if isinstance(dev, dict) else None) or []:
                    if isinstance(taint, dict):
                        # v1 defaulting, then metav1.Time's own encoding (UTC, seconds, "Z").
                        taint["timeAdded"] = _rfc3339(taint.get("timeAdded") or now)
        elif kind.resource == "resourceclaims":
            self.unknown_fields += _prune_claim_status(obj)

    def _create(self, kind: Kind, ns: str, obj: Obj) -> Obj:
        if not isinstance(obj, dict) or obj.get("kind", kind.kind) != kind.kind:
            raise ApiError(400, "BadRequest", f"the body of the request was not a {kind.kind}")
        with self.lock:
            meta = obj.setdefault("metadata", {})
            if kind.namespaced:
                if meta.get("namespace", ns) != ns:
                    raise ApiError(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace "
                        "sent on the request",
                    )
                meta["namespace"] = ns
            if not meta.get("name") and meta.get("generateName"):
                base = meta["generateName"][:58]
                while True:
                    name = base + "".join(random.choice(_NAME_CHARS) for _ in range(5))
                    if (kind.resource, ns, name) not in self.objects:
                        break
                meta["name"] = name
            if meta.get("resourceVersion"):
                raise ApiError(
                    500,
                    "InternalError",
                    "resourceVersion should not be set on objects to be created",
                )
            self._prepare(kind, obj)
            causes = (
                validate_slice(obj, None)
                if kind.resource == "resourceslices"
                else _validate_meta(obj, kind.namespaced)
            )
            if causes:
                raise _invalid_error(kind, str(meta.get("name", "")), causes)
            key = (kind.resource, ns, meta["name"])
            if key in self.objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{kind.qualified} "{meta["name"]}" already exists',
                    {"name": meta["name"], "group": kind.group, "kind": kind.resource},
                )
            self.rv += 1
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = str(self.rv)
            meta["creationTimestamp"] = _now()
            if kind.resource == "resourceslices":
                meta["generation"] = 1
            if kind.status and kind.resource == "resourceclaims":
                obj.pop("status", None)  # PrepareForCreate drops status
            self.objects[key] = obj
            self._record("ADDED", kind, obj)
            return copy.deepcopy(obj)

    def _update(self, kind: Kind, ns: str, name: str, obj: Obj, subresource: str) -> Obj:
        if not isinstance(obj, dict) or obj.get("kind", kind.kind) != kind.kind:
            raise ApiError(400, "BadRequest", f"the body of the request was not a {kind.kind}")
        with self.lock:
            self._outside_change(kind, ns, name)
            key = (kind.resource, ns, name)
            old = self.objects.get(key)
            if old is None:
                raise _not_found(kind, name)
            meta = obj.setdefault("metadata", {})
            if meta.get("name", name) != name:
                raise ApiError(
                    400,
                    "BadRequest",
                    f'the name of the object ({meta.get("name")}) does not match the name on '
                    f"the URL ({name})",
                )
            rv = meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise _conflict(kind, name)
            if subresource == "status":
                new = copy.deepcopy(old)
                if "status" in obj:
                    new["status"] = obj["status"]
                else:
                    new.pop("status", None)
                obj = new
            else:
                for fixed in ("uid", "creationTimestamp", "generation", "namespace"):
                    if fixed in old["metadata"]:
                        meta[fixed] = old["metadata"][fixed]
                meta["name"] = name
                if kind.status and "status" in old:
                    obj["status"] = copy.deepcopy(old["status"])
                elif kind.status:
                    obj.pop("status", None)
            self._prepare(kind, obj, old)
            if kind.resource == "resourceslices":
                causes = validate_slice(obj, old)
            elif kind.resource == "resourceclaims" and subresource == "status":
                causes = validate_claim_status(obj, old)
            else:
                causes = _validate_meta(obj, kind.namespaced)
            if causes:
                raise _invalid_error(kind, name, causes)
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if obj == old:
                return copy.deepcopy(old)  # a no-op update writes nothing, keeps the version
            if kind.resource == "resourceslices" and obj.get("spec") != old.get("spec"):
                obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[key] = obj
            self._record("MODIFIED", kind, obj)
            return copy.deepcopy(obj)

    def _delete(
        self, kind: Kind, ns: str, name: str, precondition_rv: str = "", precondition_uid: str = ""
    ) -> Obj:
        with self.lock:
            key = (kind.resource, ns, name)
            old = self.objects.get(key)
            if old is None:
                raise _not_found(kind, name)
            if precondition_uid and precondition_uid != old["metadata"]["uid"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind.qualified} "{name}": '
                    f"Precondition failed: UID in precondition: {precondition_uid}, "
                    f'UID in object meta: {old["metadata"]["uid"]}',
                    {"name": name, "group": kind.group, "kind": kind.resource},
                )
            if precondition_rv and precondition_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind.qualified} "{name}": '
                    f"Precondition failed: ResourceVersion in precondition: {precondition_rv}, "
                    f'ResourceVersion in object meta: {old["metadata"]["resourceVersion"]}',
                    {"name": name, "group": kind.group, "kind": kind.resource},
                )
            del self.objects[key]
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", kind, gone)
            return gone

    def _matcher(
        self, kind: Kind, namespace: Optional[str], query: Dict[str, str]
    ) -> Callable[[Obj], bool]:
        fields = _selector(query.get("fieldSelector", ""), "field")
        labels = _selector(query.get("labelSelector", ""), "label")
        allowed = ("metadata.name", "metadata.namespace") + kind.fields
        for path, _, _ in fields:
            if path not in allowed:
                raise ApiError(400, "BadRequest", f"field label not supported: {path}")

        def match(obj: Obj) -> bool:
            meta = obj["metadata"]
            if namespace is not None and meta.get("namespace", "") != namespace:
                return False
            for path, op, want in fields:
                if (_field_value(obj, path) == want) != (op == "="):
                    return False
            for key, op, want in labels:
                have = (meta.get("labels") or {}).get(key)
                if (have == want) != (op == "="):
                    return False
            return True

        return match

    # -- watch -----------------------------------------------------------------------------
    def _watch_events(
        self,
        kind: Kind,
        match: Callable[[Obj], bool],
        since: Optional[int],
        deadline: float,
        bookmarks: bool,
        emit: Callable[[Obj], None],
    ) -> bool:
        with self.lock:
            if since is None:
                start = self.rv
                initial = [
                    o
                    for (r, _, _), o in sorted(self.objects.items())
                    if r == kind.resource and match(o)
                ]
                batch = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in initial]
            else:
                if since < self.compacted:
                    batch = [
                        {
                            "type": "ERROR",
                            "object": ApiError(
                                410,
                                "Expired",
                                f"too old resource version: {since} ({self.compacted + 1})",
                            ).body(),
                        }
                    ]
                    start = -1
                else:
                    start = since
                    batch = []
        if start < 0:
            emit(batch[0])
            return True
        for event in batch:
            emit(event)
        sent = start
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            with self.lock:
                while True:
                    if self._down.is_set():
                        return False
                    pending = [e for e in self.events if e.rv > sent and e.kind is kind]
                    now = time.monotonic()
                    if pending or now >= deadline or (bookmarks and now >= next_bookmark):
                        break
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    self.lock.wait(max(0.0, wake - now))
                current = self.rv
            for e in pending:
                sent = e.rv
                if match(e.obj):
                    emit({"type": e.type, "object": copy.deepcopy(e.obj)})
            now = time.monotonic()
            if now >= deadline:
                if bookmarks:
                    emit(self._bookmark(kind, max(sent, current)))
                return True
            if bookmarks and now >= next_bookmark:
                with self.lock:
                    if not [e for e in self.events if e.rv > sent and e.kind is kind]:
                        sent = max(sent, self.rv)
                emit(self._bookmark(kind, sent))
                next_bookmark = now + self.bookmark_interval

    @staticmethod
    def _bookmark(kind: Kind, rv: int) -> Obj:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": kind.kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)},
            },
        }


def _uses_taints(slice_obj: Optional[Obj]) -> bool:
    devices = ((slice_obj or {}).get("spec") or {}).get("devices") or []
    return any(isinstance(d, dict) and d.get("taints") for d in devices)


def _socket_in(netns: str) -> socket.socket:
    """A TCP socket of the network namespace `netns`, made in a throwaway thread that enters
    it (a socket stays in the namespace it was made in; no other thread switches)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    out: List[Any] = []

    def make() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            out.append(sock)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)

    t = threading.Thread(target=make, name="netns-socket")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


_PATH = re.compile(
    r"/(?:apis/(?P<group>[a-z0-9.]+)/(?P<gv>v1)|api/(?P<cv>v1))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?"
)


class _Handler(BaseHTTPRequestHandler):
    api: TestApiServer
    protocol_version = "HTTP/1.1"
    # Go's net/http sets TCP_NODELAY on every connection; without it the headers and the body,
    # written apart, meet the client's delayed ACK: 40 ms per keep-alive request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        self.api._connections.add(self.connection)

    def finish(self) -> None:
        self.api._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._serve("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(
                400, "BadRequest", f"the body of the request could not be decoded: {e}"
            ) from None

    def _send(self, status: int, body: Obj, warnings: Optional[List[str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for w in warnings or []:
            escaped = w.replace("\\", "\\\\").replace('"', '\\"')
            self.send_header("Warning", f'299 - "{escaped}"')
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method: str) -> None:
        api = self.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with api.lock:
            api.requests.append((method, url.path, url.query))
        if api.slow:
            time.sleep(api.slow)
        if api._down.is_set():
            self.close_connection = True
            return
        try:
            m = _PATH.fullmatch(url.path)
            kind = KINDS.get(m.group("resource")) if m else None
            if m is None or kind is None or (m.group("group") or "") != kind.group:
                raise ApiError(
                    404, "NotFound", "the server could not find the requested resource", {}
                )
            ns = m.group("ns") or ""
            name = m.group("name") or ""
            sub = m.group("sub") or ""
            if ns and not kind.namespaced:
                raise ApiError(
                    404, "NotFound", "the server could not find the requested resource", {}
                )
            if sub and (sub != "status" or not kind.status or not name):
                raise ApiError(
                    404, "NotFound", "the server could not find the requested resource", {}
                )
            before = len(api.unknown_fields)
            status, body = self._dispatch(method, kind, ns, name, sub, query)
            with api.lock:
                warnings = [f'unknown field "{f}"' for f in api.unknown_fields[before:]]
            if body is not None:
                self._send(status, body, warnings)
        except ApiError as e:
            self._send(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _dispatch(
        self, method: str, kind: Kind, ns: str, name: str, sub: str, query: Dict[str, str]
    ) -> Tuple[int, Optional[Obj]]:
        api = self.api
        namespace: Optional[str] = ns if kind.namespaced and ns else None
        if method == "GET" and not name:
            match = api._matcher(kind, namespace, query)
            if query.get("watch") in ("true", "1"):
                self._watch(kind, match, query)
                return 200, None
            with api.lock:
                items = [
                    copy.deepcopy(o)
                    for (r, _, _), o in sorted(api.objects.items())
                    if r == kind.resource and match(o)
                ]
                rv = api.rv
            for item in items:
                item.pop("apiVersion", None)
                item.pop("kind", None)
            return 200, {
                "kind": kind.kind + "List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
        if method == "GET":
            obj = api.get(kind.resource, name, ns if kind.namespaced else "")
            if obj is None:
                raise _not_found(kind, name)
            return 200, obj
        if method == "POST" and not name:
            if kind.namespaced and not ns:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            return 201, api._create(kind, ns, self._body())
        if method == "PUT" and name:
            return 200, api._update(kind, ns if kind.namespaced else "", name, self._body(), sub)
        if method == "PATCH" and name:
            return 200, self._patch(kind, ns if kind.namespaced else "", name, sub)
        if method == "DELETE" and name:
            options = self._body() or {}
            pre = options.get("preconditions") or {}
            return 200, api._delete(
                kind,
                ns if kind.namespaced else "",
                name,
                pre.get("resourceVersion", ""),
                pre.get("uid", ""),
            )
        if method == "DELETE":
            match = api._matcher(kind, namespace, query)
            self._body()
            with api.lock:
                names = [
                    (o["metadata"].get("namespace", ""), o["metadata"]["name"])
                    for (r, _, _), o in sorted(api.objects.items())
                    if r == kind.resource and match(o)
                ]
                gone = []
                for obj_ns, obj_name in names:
                    item = api._delete(kind, obj_ns, obj_name)
                    item.pop("apiVersion", None)
                    item.pop("kind", None)
                    gone.append(item)
                rv = api.rv
            return 200, {
                "kind": kind.kind + "List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": gone,
            }
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )

    def _patch(self, kind: Kind, ns: str, name: str, sub: str) -> Obj:
        api = self.api
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        patch = self._body()
        with api.lock:
            api._outside_change(kind, ns, name)
            current = api.get(kind.resource, name, ns)
            if current is None:
                raise _not_found(kind, name)
            try:
                if ctype == "application/merge-patch+json":
                    if not isinstance(patch, dict):
                        raise PatchError(400, "BadRequest", "merge patch is not a JSON object")
                    new = merge_patch(current, patch)
                elif ctype == "application/strategic-merge-patch+json":
                    if not isinstance(patch, dict):
                        raise PatchError(
                            400, "BadRequest", "strategic merge patch is not a JSON object"
                        )
                    new = strategic_merge_patch(current, patch)
                elif ctype == "application/json-patch+json":
                    new = json_patch(current, patch)
                else:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media "
                        "types include: application/json-patch+json, "
                        "application/merge-patch+json, application/strategic-merge-patch+json",
                    )
            except PatchError as e:
                raise ApiError(e.status, e.reason, e.message) from None
            # A resourceVersion the patch sets is a precondition; otherwise the patch applies
            # to the current object (the server retries its own internal conflicts).
            if not (
                isinstance(patch, dict) and (patch.get("metadata") or {}).get("resourceVersion")
            ):
                if isinstance(new, dict):
                    new.setdefault("metadata", {})["resourceVersion"] = current["metadata"][
                        "resourceVersion"
                    ]
            return api._update(kind, ns, name, new, sub)

    def _watch(self, kind: Kind, match: Callable[[Obj], bool], query: Dict[str, str]) -> None:
        rv = query.get("resourceVersion", "")
        since: Optional[int] = None
        if rv not in ("", "0"):
            try:
                since = int(rv)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resource version: {rv}") from None
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = self.api.bookmarks and query.get("allowWatchBookmarks") in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

        def emit(event: Obj) -> None:
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            if self.api._watch_events(
                kind, match, since, time.monotonic() + timeout, bookmarks, emit
            ):
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
