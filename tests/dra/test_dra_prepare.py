"""virtdp_serve.prepare: a ResourceClaim as the API returns it -> the record entry, or one
per-claim error. Claims are built in the v1 shape the scheduler writes."""

from __future__ import annotations

import copy

import pytest

from virtcore import claims
from virtcore.claims import ClaimedDevice, PodRef
from virtdp_serve.prepare import ClaimError, ClaimRef, base_request, prepare

DRIVER = "virt.kernel.org"
NODE = "node-a"
UID = "6b1f2a9e-1c1e-4a43-9c57-0e6c1b0d2f10"
A, B, C = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"
OFFERED = {claims.device_name(p): p for p in (A, B, C)}
REF = ClaimRef("default", "c", UID)


def _claim(results, *, config=(), reserved=None, selector=True):
    alloc = {"devices": {"results": results, "config": list(config)}}
    if selector:
        alloc["nodeSelector"] = {
            "nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE]}]}
            ]
        }
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "default", "uid": UID},
        "spec": {"devices": {"requests": []}},
        "status": {
            "allocation": alloc,
            "reservedFor": (
                reserved
                if reserved is not None
                else [{"resource": "pods", "name": "web", "uid": "pod-1"}]
            ),
        },
    }


def _r(pci, request="nic", driver=DRIVER, pool=NODE):
    return {"request": request, "driver": driver, "pool": pool, "device": claims.device_name(pci)}


def _cfg(params, requests=None, source="FromClaim", driver=DRIVER):
    entry = {"source": source, "opaque": {"driver": driver, "parameters": params}}
    if requests is not None:
        entry["requests"] = requests
    return entry


def _prep(doc, offered=OFFERED):
    return prepare(doc, REF, driver=DRIVER, node=NODE, offered=offered)


def test_plain_claim():
    got = _prep(_claim([_r(A)]))
    assert (got.uid, got.namespace, got.name, got.driver) == (UID, "default", "c", DRIVER)
    assert got.pods == (PodRef("pod-1", "default", "web"),)
    assert got.devices == (ClaimedDevice("nic", NODE, claims.device_name(A), A, None),)


def test_results_of_other_drivers_are_left_to_them():
    got = _prep(_claim([_r(A, driver="gpu.example.com"), _r(B, request="net")]))
    assert [(d.request, d.pci_address) for d in got.devices] == [("net", B)]


def test_config_per_request_and_for_all_later_wins_subrequests_match_their_base():
    doc = _claim(
        [_r(A, "a"), _r(B, "b/fast"), _r(C, "c")],
        config=[
            _cfg({"interfaceName": "cls0"}, source="FromClass"),  # all requests
            _cfg({"interfaceName": "net-a"}, ["a"]),
            _cfg({"interfaceName": "net-b"}, ["b"]),  # the base name covers b/fast
            _cfg({}, ["c"]),  # no name for c: the class's stays
            _cfg({"interfaceName": "ignored"}, driver="other.example.com"),
        ],
    )
    got = {d.request: d.interface_name for d in _prep(doc).devices}
    assert got == {"a": "net-a", "b/fast": "net-b", "c": "cls0"}
    assert base_request("b/fast") == "b"


def test_no_parameters_is_an_empty_config():
    doc = _claim([_r(A)], config=[{"source": "FromClaim", "opaque": {"driver": DRIVER}}])
    assert _prep(doc).devices[0].interface_name is None


def test_reserved_for_keeps_pods_only():
    doc = _claim(
        [_r(A)],
        reserved=[
            {"resource": "pods", "name": "web", "uid": "pod-1"},
            {"apiGroup": "example.com", "resource": "pods", "name": "x", "uid": "x-1"},
            {"resource": "podgroups", "name": "g", "uid": "g-1"},
        ],
    )
    assert _prep(doc).pods == (PodRef("pod-1", "default", "web"),)


def test_a_selector_on_labels_only_is_not_judged_here():
    doc = _claim([_r(A)], selector=False)
    doc["status"]["allocation"]["nodeSelector"] = {
        "nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}
        ]
    }
    assert _prep(doc).devices[0].pci_address == A


def _broken(mutate):
    doc = _claim([_r(A)])
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    "doc, expected",
    [
        ([], "the API answered list, expected an object"),
        (_broken(lambda d: d["metadata"].update(uid="other")), "has uid other, the kubelet asked"),
        (_broken(lambda d: d.pop("status")), "is not allocated"),
        (
            _broken(lambda d: d["status"]["allocation"]["devices"].update(results=[])),
            "is allocated no devices, none of driver virt.kernel.org",
        ),
        (
            _broken(lambda d: d["status"]["allocation"]["devices"]["results"][0].pop("pool")),
            "allocation result 0 of virt.kernel.org lacks request, pool or device",
        ),
        (
            _broken(
                lambda d: d["status"]["allocation"]["devices"]["results"][0].update(
                    adminAccess=True
                )
            ),
            "is allocated with adminAccess; a NIC moves into one pod only",
        ),
        (
            _broken(lambda d: d["status"]["allocation"]["devices"].update(config={})),
            "status.allocation.devices.config is not a list",
        ),
        (
            _broken(
                lambda d: d["status"]["allocation"]["devices"].update(
                    config=[_cfg({"interfaceName": "net1"}, "nic")]
                )
            ),
            "opaque config 0 (FromClaim): requests is not a list of request names",
        ),
        (
            _broken(
                lambda d: d["status"]["allocation"]["devices"].update(
                    config=[_cfg({"interfaceName": 5})]
                )
            ),
            "interfaceName 5 is int, expected a string; expected a Linux interface name",
        ),
        (
            _broken(lambda d: d["status"].update(reservedFor={})),
            "status.reservedFor is not a list",
        ),
    ],
    ids=[
        "not-object",
        "uid",
        "unallocated",
        "no-results",
        "no-pool",
        "admin",
        "config-type",
        "requests-type",
        "ifname-type",
        "reserved-type",
    ],
)
def test_refusals(doc, expected):
    with pytest.raises(ClaimError) as e:
        _prep(copy.deepcopy(doc))
    assert expected in str(e.value)
    assert str(e.value).startswith("ResourceClaim default/c: ")


def test_a_claim_uid_that_is_no_uid_is_refused():
    with pytest.raises(ClaimError, match="uid '../x' is not an object UID"):
        prepare(
            _claim([_r(A)]),
            ClaimRef("default", "c", "../x"),
            driver=DRIVER,
            node=NODE,
            offered=OFFERED,
        )
