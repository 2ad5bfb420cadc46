"""The test API server keeps the real kube-apiserver's semantics for what the driver uses (the
status codes, Status bodies, validation, generation, patches, watch, bookmarks, 410 Gone),
driven through the official client as the daemon drives it."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

import pytest
from conftest import DRIVER, NODE
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from testapiserver import TestApiServer

from virtcore import kubeapi

SELECTOR = f"spec.nodeName={NODE},spec.driver={DRIVER}"


def slice_body(
    devices: Optional[List[Dict[str, Any]]] = None,
    *,
    name: Optional[str] = "s1",
    node: str = NODE,
    generation: int = 1,
    count: int = 1,
) -> Dict[str, Any]:
    meta: Dict[str, Any] = {"name": name} if name else {"generateName": f"{node}-{DRIVER}-"}
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": meta,
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": count},
            "devices": devices if devices is not None else [{"name": "pci-0000-01-00-0"}],
        },
    }


def status_of(exc: ApiException) -> Dict[str, Any]:
    return json.loads(exc.body)


def raw(kube: kubeapi.Kube, call: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
    resp = call(*args, _preload_content=False, _request_timeout=kube.timeout, **kwargs)
    return json.loads(resp.data)


def watch_events(
    kube: kubeapi.Kube, rv: Optional[str], *, seconds: int = 1, bookmarks: bool = False, **kw: Any
) -> List[Dict[str, Any]]:
    kwargs: Dict[str, Any] = dict(kw)
    if rv is not None:
        kwargs["resource_version"] = rv
    resp = kube.resource().list_resource_slice(
        watch=True,
        allow_watch_bookmarks=bookmarks,
        timeout_seconds=seconds,
        _preload_content=False,
        _request_timeout=kube.watch_timeout(seconds),
        **kwargs,
    )
    return [json.loads(line) for line in iter_resp_lines(resp) if line]


def test_create_sets_server_fields_and_generate_name(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    made = raw(kube, r.create_resource_slice, slice_body(name=None))
    meta = made["metadata"]
    assert (
        meta["name"].startswith(f"{NODE}-{DRIVER}-")
        and len(meta["name"]) == len(f"{NODE}-{DRIVER}-") + 5
    )
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0
    assert made["kind"] == "ResourceSlice" and made["apiVersion"] == "resource.k8s.io/v1"
    listed = raw(kube, r.list_resource_slice, field_selector=SELECTOR)
    assert listed["kind"] == "ResourceSliceList"
    assert [i["metadata"]["name"] for i in listed["items"]] == [meta["name"]]
    assert "kind" not in listed["items"][0]  # list items carry no type, as the real server's
    # The typed path of the client reads what the server returns (its models forbid extras).
    typed = r.read_resource_slice(meta["name"], _request_timeout=kube.timeout)
    assert typed.spec.pool.generation == 1


def test_conflict_notfound_alreadyexists_bodies(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    made = raw(kube, r.create_resource_slice, slice_body())
    stale = slice_body()
    stale["metadata"]["resourceVersion"] = str(int(made["metadata"]["resourceVersion"]) - 1)
    with pytest.raises(ApiException) as e:
        r.replace_resource_slice("s1", stale, _request_timeout=kube.timeout)
    body = status_of(e.value)
    assert e.value.status == 409 and body["reason"] == "Conflict" and body["kind"] == "Status"
    assert body["details"] == {"name": "s1", "group": "resource.k8s.io", "kind": "resourceslices"}
    assert "the object has been modified" in body["message"]
    with pytest.raises(ApiException) as e:
        r.create_resource_slice(slice_body(), _request_timeout=kube.timeout)
    assert e.value.status == 409 and status_of(e.value)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as e:
        r.read_resource_slice("nope", _request_timeout=kube.timeout)
    body = status_of(e.value)
    assert e.value.status == 404 and body["reason"] == "NotFound"
    assert body["message"] == 'resourceslices.resource.k8s.io "nope" not found'
    with pytest.raises(ApiException) as e:
        r.delete_resource_slice("nope", _request_timeout=kube.timeout)
    assert e.value.status == 404
    f = kubeapi.failure(e.value)
    assert f is not None and (f.status, f.reason, f.transient) == (404, "NotFound", False)


def test_update_generation_and_unconditional(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    made = raw(kube, r.create_resource_slice, slice_body())
    rv0 = made["metadata"]["resourceVersion"]
    # No resourceVersion: an unconditional update (the strategy allows it).
    same = raw(kube, r.replace_resource_slice, "s1", slice_body())
    assert same["metadata"]["resourceVersion"] == rv0  # nothing changed: nothing written
    labelled = slice_body()
    labelled["metadata"]["labels"] = {"a": "b"}
    out = raw(kube, r.replace_resource_slice, "s1", labelled)
    assert out["metadata"]["generation"] == 1  # metadata only: same generation
    assert int(out["metadata"]["resourceVersion"]) > int(rv0)
    changed = slice_body([{"name": "pci-0000-01-01-0"}], generation=2)
    out = raw(kube, r.replace_resource_slice, "s1", changed)
    assert out["metadata"]["generation"] == 2  # the spec changed


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (
            lambda b: b["spec"]["devices"][0].update(name="Pci_0"),
            "spec.devices[0].name",
            "FieldValueInvalid",
        ),
        (
            lambda b: b["spec"]["devices"].append({"name": "pci-0000-01-00-0"}),
            "spec.devices[1].name",
            "FieldValueDuplicate",
        ),
        (
            lambda b: b["spec"]["pool"].update(resourceSliceCount=0),
            "spec.pool.resourceSliceCount",
            "FieldValueInvalid",
        ),
        (
            lambda b: b["spec"]["pool"].update(generation=-1),
            "spec.pool.generation",
            "FieldValueInvalid",
        ),
        (lambda b: b["spec"]["pool"].update(name="Node_A"), "spec.pool.name", "FieldValueInvalid"),
        (lambda b: b["spec"].update(allNodes=True), "spec", "FieldValueInvalid"),
        (lambda b: b["spec"].pop("nodeName"), "spec", "FieldValueRequired"),
        (
            lambda b: b["spec"]["devices"][0].update(attributes={"pci-address": {"string": "x"}}),
            "spec.devices[0].attributes",
            "FieldValueInvalid",
        ),
        (
            lambda b: b["spec"]["devices"][0].update(attributes={"a": {"string": "x", "int": 1}}),
            "spec.devices[0].attributes[a]",
            "FieldValueInvalid",
        ),
        (
            lambda b: b["spec"]["devices"][0].update(attributes={"a": {"string": "x" * 65}}),
            "spec.devices[0].attributes[a].string",
            "FieldValueTooLong",
        ),
        (
            lambda b: b["spec"]["devices"][0].update(
                taints=[{"key": "virt.kernel.org/no-carrier", "effect": "PreferNoSchedule"}]
            ),
            "spec.devices[0].taints[0].effect",
            "FieldValueNotSupported",
        ),
        (
            lambda b: b["spec"]["devices"][0].update(
                taints=[{"key": "bad key", "effect": "NoSchedule"}]
            ),
            "spec.devices[0].taints[0].key",
            "FieldValueInvalid",
        ),
        (
            lambda b: b["spec"].update(devices=[{"name": f"d{i}"} for i in range(129)]),
            "spec.devices",
            "FieldValueTooMany",
        ),
        (
            lambda b: b["spec"].update(
                devices=[
                    {"name": f"d{i}", "taints": [{"key": "k", "effect": "NoSchedule"}]}
                    for i in range(65)
                ]
            ),
            "spec.devices",
            "FieldValueTooMany",
        ),
    ],
)
def test_invalid_slice_is_422_with_causes(
    kube: kubeapi.Kube, mutate: Any, field: str, reason: str
) -> None:
    body = slice_body()
    mutate(body)
    with pytest.raises(ApiException) as e:
        kube.resource().create_resource_slice(body, _request_timeout=kube.timeout)
    status = status_of(e.value)
    assert e.value.status == 422 and status["reason"] == "Invalid"
    assert status["message"].startswith('ResourceSlice.resource.k8s.io "s1" is invalid: [')
    assert status["details"]["kind"] == "ResourceSlice"
    causes = {(c["field"], c["reason"]) for c in status["details"]["causes"]}
    assert (field, reason) in causes, causes


def test_limits_at_the_edge_are_valid(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    r.create_resource_slice(
        slice_body([{"name": f"d{i}"} for i in range(128)]), _request_timeout=kube.timeout
    )
    tainted = [
        {"name": f"d{i}", "taints": [{"key": "k", "effect": "NoSchedule"}]} for i in range(64)
    ]
    r.create_resource_slice(slice_body(tainted, name="s2"), _request_timeout=kube.timeout)


def test_immutable_fields_on_update(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    r.create_resource_slice(slice_body(), _request_timeout=kube.timeout)
    moved = slice_body()
    moved["spec"]["pool"]["name"] = "other-pool"
    with pytest.raises(ApiException) as e:
        r.replace_resource_slice("s1", moved, _request_timeout=kube.timeout)
    assert e.value.status == 422
    assert "field is immutable" in status_of(e.value)["message"]


def test_taint_time_defaulted_and_normalized(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    devs = [
        {"name": "a", "taints": [{"key": "k", "effect": "NoSchedule"}]},
        {
            "name": "b",
            "taints": [
                {"key": "k", "effect": "None", "timeAdded": "2025-01-02T03:04:05.678+01:00"}
            ],
        },
    ]
    made = raw(kube, r.create_resource_slice, slice_body(devs))
    a, b = made["spec"]["devices"]
    assert a["taints"][0]["timeAdded"].endswith("Z")
    assert b["taints"][0]["timeAdded"] == "2025-01-02T02:04:05Z"
    # An update that omits it gets the current time, not the stored one: the spec changes.
    devs[1]["taints"][0].pop("timeAdded")
    again = raw(kube, r.replace_resource_slice, "s1", slice_body(devs))
    assert again["spec"]["devices"][1]["taints"][0]["timeAdded"] > "2026"
    assert again["metadata"]["generation"] == 2


def test_patch_types(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    made = raw(kube, r.create_resource_slice, slice_body())
    out = raw(kube, r.patch_resource_slice, "s1", {"metadata": {"labels": {"x": "1"}}})
    assert out["metadata"]["labels"] == {"x": "1"}  # the client sends strategic merge here
    out = raw(
        kube,
        r.patch_resource_slice,
        "s1",
        {"metadata": {"labels": {"x": None}}},
        _content_type="application/merge-patch+json",
    )
    assert "x" not in (out["metadata"].get("labels") or {})
    ops = [{"op": "test", "path": "/spec/pool/generation", "value": 7}]
    with pytest.raises(ApiException) as e:
        r.patch_resource_slice("s1", ops, _request_timeout=kube.timeout)
    assert e.value.status == 422
    ops = [
        {"op": "test", "path": "/spec/pool/generation", "value": 1},
        {"op": "add", "path": "/spec/devices/-", "value": {"name": "pci-0000-01-01-0"}},
    ]
    out = raw(kube, r.patch_resource_slice, "s1", ops)
    assert [d["name"] for d in out["spec"]["devices"]] == ["pci-0000-01-00-0", "pci-0000-01-01-0"]
    assert out["metadata"]["generation"] == 2
    # A resourceVersion in a patch is a precondition.
    stale = {"metadata": {"resourceVersion": made["metadata"]["resourceVersion"]}}
    with pytest.raises(ApiException) as e:
        r.patch_resource_slice("s1", stale, _request_timeout=kube.timeout)
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:
        r.patch_resource_slice(
            "s1", {}, _content_type="application/apply-patch+yaml", _request_timeout=kube.timeout
        )
    assert e.value.status == 415


def test_watch_from_version_initial_events_and_field_selector(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    first = raw(kube, r.create_resource_slice, slice_body())
    raw(kube, r.create_resource_slice, slice_body(name="other", node="node-b"))
    rv = first["metadata"]["resourceVersion"]
    raw(kube, r.delete_resource_slice, "s1")
    events = watch_events(kube, rv, field_selector=SELECTOR)
    # node-b's slice was created after rv too, but the selector keeps it out.
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "s1")]
    assert events[0]["object"]["kind"] == "ResourceSlice"  # watch objects carry their type
    # No resourceVersion: synthetic ADDED for what exists, then changes.
    events = watch_events(kube, None, field_selector="spec.nodeName=node-b")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "other")]


def test_watch_bookmarks_and_timeout(api: TestApiServer, kube: kubeapi.Kube) -> None:
    made = raw(kube, kube.resource().create_resource_slice, slice_body())
    start = time.monotonic()
    events = watch_events(kube, made["metadata"]["resourceVersion"], seconds=1, bookmarks=True)
    assert 0.9 <= time.monotonic() - start < 3  # timeoutSeconds ends the stream
    marks = [e for e in events if e["type"] == "BOOKMARK"]
    assert len(marks) >= 2  # every 0.2 s and one as the watch ends
    assert marks[-1]["object"]["metadata"] == {"resourceVersion": str(api.rv)}
    assert marks[-1]["object"]["kind"] == "ResourceSlice"
    api.bookmarks = False  # a server may ignore allowWatchBookmarks
    events = watch_events(kube, made["metadata"]["resourceVersion"], bookmarks=True)
    assert events == []


def test_watch_too_old_version_is_410_expired(api: TestApiServer, kube: kubeapi.Kube) -> None:
    made = raw(kube, kube.resource().create_resource_slice, slice_body())
    raw(kube, kube.resource().delete_resource_slice, "s1")
    api.compact()
    events = watch_events(kube, made["metadata"]["resourceVersion"])
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith("too old resource version: ")


def test_deletecollection_with_selectors_as_the_kubelet_wipes(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    raw(kube, r.create_resource_slice, slice_body(name=None))
    raw(kube, r.create_resource_slice, slice_body(name=None))
    raw(kube, r.create_resource_slice, slice_body(name="b1", node="node-b"))
    gone = raw(kube, r.delete_collection_resource_slice, field_selector=SELECTOR)
    assert gone["kind"] == "ResourceSliceList" and len(gone["items"]) == 2
    left = raw(kube, r.list_resource_slice)
    assert [i["metadata"]["name"] for i in left["items"]] == ["b1"]
    with pytest.raises(ApiException) as e:
        r.list_resource_slice(field_selector="spec.pool.name=x", _request_timeout=kube.timeout)
    assert e.value.status == 400  # not a selectable field of ResourceSlice


def test_delete_preconditions(kube: kubeapi.Kube) -> None:
    r = kube.resource()
    made = raw(kube, r.create_resource_slice, slice_body())
    raw(kube, r.patch_resource_slice, "s1", {"metadata": {"labels": {"touched": "yes"}}})
    pre = {
        "preconditions": {
            "uid": made["metadata"]["uid"],
            "resourceVersion": made["metadata"]["resourceVersion"],
        }
    }
    with pytest.raises(ApiException) as e:
        r.delete_resource_slice("s1", body=pre, _request_timeout=kube.timeout)
    assert e.value.status == 409 and "Precondition failed" in status_of(e.value)["message"]


def claim(api: TestApiServer, name: str = "c1", namespace: str = "ns1") -> Dict[str, Any]:
    c = api.create(
        "resourceclaims",
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "devices": {"requests": [{"name": "nic", "exactly": {"deviceClassName": DRIVER}}]}
            },
        },
    )
    c["status"] = {
        "allocation": {
            "devices": {
                "results": [
                    {"request": "nic", "driver": DRIVER, "pool": NODE, "device": "pci-0000-01-00-0"}
                ]
            }
        },
        "reservedFor": [
            {"resource": "pods", "name": "p1", "uid": "11111111-2222-3333-4444-555555555555"}
        ],
    }
    return api.update("resourceclaims", c, subresource="status")


def test_claim_status_subresource_rules(api: TestApiServer, kube: kubeapi.Kube) -> None:
    c = claim(api)
    r = kube.resource()
    ok = {
        "driver": DRIVER,
        "pool": NODE,
        "device": "pci-0000-01-00-0",
        "networkData": {
            "interfaceName": "net1",
            "ips": ["198.51.100.2/24"],
            "hardwareAddress": "52:54:00:00:00:01",
        },
    }
    out = raw(
        kube,
        r.patch_namespaced_resource_claim_status,
        "c1",
        "ns1",
        {"status": {"devices": [ok]}, "spec": {"devices": {"requests": []}}},
        _content_type="application/merge-patch+json",
    )
    assert out["status"]["devices"] == [ok]
    assert out["spec"] == c["spec"]  # the status subresource ignores the spec
    for bad, fragment in (
        (dict(ok, device="pci-0000-01-09-0"), "must be an allocated device in the claim"),
        (
            dict(ok, networkData=dict(ok["networkData"], ips=["198.51.100.2"])),
            "must be a valid address in CIDR form",
        ),
        (
            dict(ok, networkData=dict(ok["networkData"], ips=["2001:DB8::2/64"])),
            'must be in canonical form ("2001:db8::2/64")',
        ),
        (dict(ok, networkData=dict(ok["networkData"], interfaceName="x" * 257)), "Too long"),
    ):
        with pytest.raises(ApiException) as e:
            r.patch_namespaced_resource_claim_status(
                "c1",
                "ns1",
                {"status": {"devices": [bad]}},
                _content_type="application/merge-patch+json",
                _request_timeout=kube.timeout,
            )
        assert e.value.status == 422 and fragment in status_of(e.value)["message"]
    # A PUT of the main resource keeps the status; reservedFor merges by uid in a strategic patch.
    main = api.get("resourceclaims", "c1", "ns1")
    assert main is not None
    main["status"] = {}
    main["metadata"]["labels"] = {"l": "v"}
    api.update("resourceclaims", main)
    assert (api.get("resourceclaims", "c1", "ns1") or {})["status"]["devices"] == [ok]
    more = {
        "status": {
            "reservedFor": [
                {"resource": "pods", "name": "p2", "uid": "21111111-2222-3333-4444-555555555555"}
            ]
        }
    }
    out = raw(kube, r.patch_namespaced_resource_claim_status, "c1", "ns1", more)
    assert [p["name"] for p in out["status"]["reservedFor"]] == ["p1", "p2"]
    with pytest.raises(ApiException) as e:
        r.read_namespaced_resource_claim("c1", "ns2", _request_timeout=kube.timeout)
    assert e.value.status == 404


def test_outside_conflict_knob(api: TestApiServer, kube: kubeapi.Kube) -> None:
    made = raw(kube, kube.resource().create_resource_slice, slice_body())
    api.conflict_next("resourceslices", "s1")
    body = slice_body()
    body["metadata"]["resourceVersion"] = made["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as e:
        kube.resource().replace_resource_slice("s1", body, _request_timeout=kube.timeout)
    assert e.value.status == 409
    assert (api.get("resourceslices", "s1") or {})["metadata"]["labels"]  # the outside change


def test_down_up_and_slow(api: TestApiServer, kube: kubeapi.Kube) -> None:
    r = kube.resource()
    raw(kube, r.list_resource_slice)
    api.down()
    with pytest.raises(Exception) as e:
        r.list_resource_slice(_request_timeout=kube.timeout)
    f = kubeapi.failure(e.value)
    assert f is not None and f.unreachable and f.transient
    api.up()
    assert raw(kube, r.list_resource_slice)["items"] == []
    api.slow = 1.0
    with pytest.raises(Exception) as e:
        r.list_resource_slice(_request_timeout=(1.0, 0.3))
    f = kubeapi.failure(e.value)
    assert f is not None and f.unreachable  # a read timeout: no answer
    api.slow = 0.0


def test_down_cuts_a_running_watch(api: TestApiServer, kube: kubeapi.Kube) -> None:
    resp = kube.resource().list_resource_slice(
        watch=True, timeout_seconds=30, _preload_content=False, _request_timeout=(2.0, 35.0)
    )
    out: List[Any] = []

    def read() -> None:
        try:
            out.extend(iter_resp_lines(resp))
        except Exception as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.2)
    api.down()
    t.join(5)
    assert not t.is_alive()
    assert out and isinstance(out[-1], Exception)  # cut, not a clean end of stream
    api.up()


def test_unknown_fields_are_dropped_with_a_warning(api: TestApiServer) -> None:
    body = slice_body()
    body["spec"]["devices"][0]["bogus"] = 1
    req = urllib.request.Request(
        f"{api.url}/apis/resource.k8s.io/v1/resourceslices",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        assert resp.status == 201
        assert 'unknown field \\"spec.devices[0].bogus\\"' in resp.headers["Warning"]
        stored = json.loads(resp.read())
    assert "bogus" not in stored["spec"]["devices"][0]
    assert api.unknown_fields == ["spec.devices[0].bogus"]
    bad = urllib.request.Request(
        f"{api.url}/apis/resource.k8s.io/v1/resourceslices",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(bad, timeout=5)
    assert e.value.code == 400
