"""Preparing one DRA ResourceClaim on this node: from the claim as the API server returns it
(resource.k8s.io/v1 JSON) to the node-local record entry (`virtcore.claims.PreparedClaim`).

One function, `prepare`, checks everything the kubelet's NodePrepareResources call relies on
and raises ClaimError with one sentence naming the claim, what was wrong and what was expected:
- the claim is the one the kubelet asked for (same uid: not deleted and recreated meanwhile);
- it is allocated, to this node (the allocation's node selector), with results of this driver,
  in this node's pool, each naming a NIC this driver offers here now;
- the opaque config of this driver (`parameters`, per request or for all) is valid:
  {"interfaceName": "<Linux interface name>"} or {}; no name given to two NICs.
The pods come from `status.reservedFor` (entries of resource "pods"). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from virtcore import claims
from virtcore.claims import ClaimedDevice, PodRef, PreparedClaim

# Keys of this driver's opaque config parameters.
CONFIG_KEYS = ("interfaceName",)


class ClaimError(Exception):
    """This claim cannot be prepared; the message goes into the claim's per-claim error."""


@dataclass(frozen=True)
class ClaimRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"ResourceClaim {self.namespace}/{self.name}"


def base_request(request: str) -> str:
    """ "nic/fast" (a subrequest of a prioritized list) -> "nic"; what the kubelet matches a
    container's claim request against."""
    return request.split("/", 1)[0]


def prepare(
    doc: Any, want: ClaimRef, *, driver: str, node: str, offered: Mapping[str, str]
) -> PreparedClaim:
    """`doc`: the claim read from the API. `offered`: DRA device name -> PCI address of every
    NIC this driver offers on this node now."""
    if not isinstance(doc, dict):
        raise ClaimError(f"{want}: the API answered {type(doc).__name__}, expected an object")
    if not claims.is_uid(want.uid):
        raise ClaimError(f"{want}: uid {want.uid!r} is not an object UID")
    meta = _obj(doc, "metadata", want)
    uid = meta.get("uid")
    if uid != want.uid:
        raise ClaimError(
            f"{want}: has uid {uid}, the kubelet asked for uid {want.uid} "
            "(deleted and created again?)"
        )
    status = doc.get("status") or {}
    allocation = status.get("allocation") if isinstance(status, dict) else None
    if not isinstance(allocation, dict):
        raise ClaimError(f"{want}: is not allocated (no status.allocation), expected allocated")
    _check_node(allocation.get("nodeSelector"), want, node)
    devices = allocation.get("devices") or {}
    if not isinstance(devices, dict):
        raise ClaimError(f"{want}: status.allocation.devices is not an object")
    results = _list_or_none(devices.get("results"))
    if not isinstance(results, list):
        raise ClaimError(f"{want}: status.allocation.devices.results is not a list")
    ours = [r for r in results if isinstance(r, dict) and r.get("driver") == driver]
    if not ours:
        others = sorted({str(r.get("driver")) for r in results if isinstance(r, dict)})
        held = f"devices of driver {', '.join(others)}" if others else "no devices"
        raise ClaimError(f"{want}: is allocated {held}, none of driver {driver}")
    names = _interface_names(_list_or_none(devices.get("config")), want, driver)
    out: List[ClaimedDevice] = []
    for i, r in enumerate(ours):
        request, pool, device = (r.get("request"), r.get("pool"), r.get("device"))
        if not all(isinstance(v, str) and v for v in (request, pool, device)):
            raise ClaimError(
                f"{want}: allocation result {i} of {driver} lacks request, pool or device"
            )
        assert isinstance(request, str) and isinstance(pool, str) and isinstance(device, str)
        if pool != node:
            raise ClaimError(
                f"{want}: device {device} is in pool {pool}, expected pool {node} "
                "(this node: the claim is allocated to another node)"
            )
        if r.get("adminAccess"):
            raise ClaimError(
                f"{want}: device {device} is allocated with adminAccess; a NIC moves into one "
                "pod only, expected an ordinary allocation"
            )
        pci_address = offered.get(device)
        if pci_address is None:
            raise ClaimError(
                f"{want}: device {device} is not a NIC this driver offers on node {node} now "
                "(gone, not eligible, or in a device-plugin pool)"
            )
        out.append(
            ClaimedDevice(
                request=request,
                pool=pool,
                device=device,
                pci_address=pci_address,
                interface_name=_name_for(names, request),
            )
        )
    _check_unique_names(out, want)
    return PreparedClaim(
        uid=want.uid,
        namespace=want.namespace,
        name=want.name,
        driver=driver,
        pods=_pods(_list_or_none(status.get("reservedFor")), want),
        devices=tuple(out),
    )


def _list_or_none(value: Any) -> Any:
    """An omitted (or null) list is empty; anything else is checked by the caller."""
    return [] if value is None else value


def _obj(doc: Dict[str, Any], key: str, want: ClaimRef) -> Dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ClaimError(f"{want}: the API answer has no {key}")
    return value


def _check_node(selector: Any, want: ClaimRef, node: str) -> None:
    """The scheduler pins a node-local allocation with `matchFields: metadata.name In [node]`;
    a selector on labels only cannot be checked here (the pool name still is)."""
    if not isinstance(selector, dict):
        return
    named: List[str] = []
    for term in selector.get("nodeSelectorTerms") or []:
        if not isinstance(term, dict):
            continue
        for f in term.get("matchFields") or []:
            if isinstance(f, dict) and f.get("key") == "metadata.name":
                values = [str(v) for v in f.get("values") or []]
                if f.get("operator") == "In" and node in values:
                    return
                named.extend(values)
    if named:
        raise ClaimError(
            f"{want}: is allocated to node {', '.join(sorted(set(named)))}, not to {node}"
        )


def _interface_names(configs: Any, want: ClaimRef, driver: str) -> List[Tuple[List[str], str]]:
    """(requests it applies to (empty: all), interfaceName) per config of this driver that
    names one, in the order the allocation lists them (class configs first; later wins)."""
    if not isinstance(configs, list):
        raise ClaimError(f"{want}: status.allocation.devices.config is not a list")
    out: List[Tuple[List[str], str]] = []
    for i, entry in enumerate(configs):
        opaque = entry.get("opaque") if isinstance(entry, dict) else None
        if not isinstance(opaque, dict) or opaque.get("driver") != driver:
            continue
        where = f"{want}: opaque config {i} ({entry.get('source', 'FromClaim')})"
        params = opaque.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ClaimError(
                f"{where}: parameters is {type(params).__name__}, expected an object such as "
                '{"interfaceName": "net1"}'
            )
        unknown = sorted(k for k in params if k not in CONFIG_KEYS)
        if unknown:
            raise ClaimError(
                f"{where}: unknown parameter {', '.join(unknown)}; "
                f"expected only {', '.join(CONFIG_KEYS)}"
            )
        if "interfaceName" not in params:
            continue
        name = params["interfaceName"]
        why = claims.ifname_problem(name)
        if why:
            raise ClaimError(
                f"{where}: interfaceName {name!r} {why}; expected a Linux interface name "
                "such as net1"
            )
        requests = entry.get("requests") or []
        if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
            raise ClaimError(f"{where}: requests is not a list of request names")
        out.append((list(requests), name))
    return out


def _name_for(names: List[Tuple[List[str], str]], request: str) -> Optional[str]:
    chosen: Optional[str] = None
    for requests, name in names:
        if not requests or request in requests or base_request(request) in requests:
            chosen = name
    return chosen


def _check_unique_names(devices: List[ClaimedDevice], want: ClaimRef) -> None:
    by_name: Dict[str, List[ClaimedDevice]] = {}
    for d in devices:
        if d.interface_name is not None:
            by_name.setdefault(d.interface_name, []).append(d)
    for name, devs in sorted(by_name.items()):
        if len(devs) > 1:
            listed = ", ".join(f"{d.device} (request {d.request})" for d in devs)
            raise ClaimError(
                f"{want}: interfaceName {name} applies to {len(devs)} NICs: {listed}; "
                "expected one NIC per interfaceName (give it per request, one device each)"
            )


def _pods(reserved: Any, want: ClaimRef) -> Tuple[PodRef, ...]:
    if not isinstance(reserved, list):
        raise ClaimError(f"{want}: status.reservedFor is not a list")
    pods = []
    for r in reserved:
        if not isinstance(r, dict) or r.get("resource") != "pods" or r.get("apiGroup"):
            continue
        uid, name = r.get("uid"), r.get("name")
        if claims.is_uid(uid) and isinstance(name, str) and name:
            assert isinstance(uid, str)
            pods.append(PodRef(uid=uid, namespace=want.namespace, name=name))
    return tuple(pods)
