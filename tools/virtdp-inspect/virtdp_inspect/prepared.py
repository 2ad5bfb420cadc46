"""The DRA claims virtdp-serve prepared on this node (its `claims.json`), joined with where each
claimed NIC is now, the network status ehost-device recorded for it, and, with API access, what
the API server says of the claim (its allocation, reservedFor and device status).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from virtcore import claims
from virtdp_inspect.locate import Locator


@dataclass(frozen=True)
class Record:
    """What the node holds: prepared claims, network status files, and what was wrong."""

    directory: str
    prepared: Tuple[claims.PreparedClaim, ...]
    statuses: Tuple[claims.DeviceStatus, ...]
    problems: Tuple[str, ...]


def read(directory: str) -> Record:
    """The node's record. Raises claims.ClaimRecordError when claims.json is unusable; a
    malformed status file is a problem line, not an error."""
    prepared = claims.load(directory)
    bad: List[claims.ClaimRecordError] = []
    problems: List[str] = []
    try:
        statuses = claims.load_statuses(directory, errors=bad)
    except OSError as e:
        statuses = []
        problems.append(f"network status files unreadable: {e}")
    problems += [f"network status skipped: {e}" for e in bad]
    known = {(c.uid, d.device) for c in prepared.values() for d in c.devices}
    for s in statuses:
        if (s.claim_uid, s.device) not in known:
            problems.append(
                f"network status of {s.device} for claim {s.claim_namespace}/{s.claim_name} "
                f"({s.claim_uid}) names no prepared claim: left by a DEL that never came?"
            )
    order = sorted(prepared.values(), key=lambda c: (c.namespace, c.name, c.uid))
    return Record(directory, tuple(order), tuple(statuses), tuple(problems))


# -- the API's view -------------------------------------------------------------------------------

CLAIM_PATH = "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}"


@dataclass(frozen=True)
class ApiClaim:
    """One claim as the API server has it, for this driver; `error` when it could not be read."""

    uid: Optional[str] = None
    allocated: Tuple[Tuple[str, str, str], ...] = ()  # (request, pool, device) of this driver
    reserved_for: Tuple[str, ...] = ()  # "<resource>/<name>" (uid)
    network_data: Mapping[Tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    error: Optional[str] = None


def from_api(kube: Any, prepared: Sequence[claims.PreparedClaim]) -> Dict[str, ApiClaim]:
    """Each prepared claim read from the API (by namespace and name), by our record's UID."""
    from virtcore import kubeapi

    out: Dict[str, ApiClaim] = {}
    for c in prepared:
        try:
            obj = kube.get_json(CLAIM_PATH, namespace=c.namespace, name=c.name)
        except Exception as e:  # noqa: BLE001 - classified below, else re-raised
            f = kubeapi.failure(e)
            if f is None:
                raise
            why = "not found (deleted since it was prepared?)" if f.status == 404 else str(f)
            out[c.uid] = ApiClaim(error=why)
            continue
        out[c.uid] = _api_claim(obj, c.driver)
    return out


def _api_claim(obj: Mapping[str, Any], driver: str) -> ApiClaim:
    status = obj.get("status") or {}
    results = ((status.get("allocation") or {}).get("devices") or {}).get("results") or []
    network: Dict[Tuple[str, str], Mapping[str, Any]] = {}
    for d in status.get("devices") or []:
        if d.get("driver") == driver:
            network[(str(d.get("pool")), str(d.get("device")))] = d.get("networkData") or {}
    return ApiClaim(
        uid=(obj.get("metadata") or {}).get("uid"),
        allocated=tuple(
            (str(r.get("request")), str(r.get("pool")), str(r.get("device")))
            for r in results
            if r.get("driver") == driver
        ),
        reserved_for=tuple(
            f"{r.get('resource')}/{r.get('name')} ({r.get('uid')})"
            for r in status.get("reservedFor") or []
        ),
        network_data=network,
    )


# -- rows ---------------------------------------------------------------------------------------


def rows(
    record: Record, locator: Locator, api: Optional[Mapping[str, ApiClaim]] = None
) -> List[Dict[str, Any]]:
    """One row per claimed NIC: the claim, its pods, where the NIC is, its recorded status, and
    (with `api`) the API's allocation and device status for it."""
    statuses = {(s.claim_uid, s.device): s for s in record.statuses}
    out = []
    for c in record.prepared:
        for d in c.devices:
            place = locator.place(d.pci_address)
            s = statuses.get((c.uid, d.device))
            out.append(
                {
                    "namespace": c.namespace,
                    "claim": c.name,
                    "claim_uid": c.uid,
                    "driver": c.driver,
                    "pods": [f"{p.namespace}/{p.name}" for p in c.pods],
                    "pod_uids": [p.uid for p in c.pods],
                    "request": d.request,
                    "pool": d.pool,
                    "device": d.device,
                    "pci_address": d.pci_address,
                    "interface_name": d.interface_name,
                    "location": place.location,
                    "netns": place.netns,
                    "netns_path": place.netns_path,
                    "ifname": place.ifname,
                    "host_ifname": place.host_ifname,
                    "numa_node": place.numa_node,
                    "note": place.note,
                    "status": _status(s) if s else None,
                    "api": _api_row(api.get(c.uid), c, d) if api is not None else None,
                }
            )
    return out


def _status(s: claims.DeviceStatus) -> Dict[str, Any]:
    return {
        "pod_uid": s.pod_uid,
        "container_id": s.container_id,
        "if_name": s.if_name,
        "interface_name": s.interface_name,
        "ips": list(s.ips),
        "hardware_address": s.hardware_address,
    }


def _api_row(
    a: Optional[ApiClaim], c: claims.PreparedClaim, d: claims.ClaimedDevice
) -> Dict[str, Any]:
    if a is None or a.error is not None:
        return {"error": a.error if a else "not read"}
    note = None
    if a.uid != c.uid:
        note = f"the API's claim of this name has UID {a.uid}, the prepared one {c.uid}"
    return {
        "error": None,
        "allocated": (d.request, d.pool, d.device) in a.allocated,
        "reserved_for": list(a.reserved_for),
        "network_data": dict(a.network_data.get((d.pool, d.device)) or {}) or None,
        "note": note,
    }
