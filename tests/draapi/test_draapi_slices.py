"""The ResourceSlice publisher against the test API server: what it publishes (pool, slices,
attributes, taints, owner), how it follows inventory updates (hot-plug, unplug, carrier), and how
it keeps the API right on its own (outside edits and deletes, the kubelet's wipe, conflicts, an
unreachable API, an expired watch, a restart) without polling."""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterator, List

import pytest
from conftest import DRIVER, NODE, dra, pci, wait_for
from testapiserver import TestApiServer

from virtcore import kubeapi
from virtdp_serve import slices
from virtdp_serve.inventory import NO_CARRIER, NO_NETDEV


@pytest.fixture
def publisher(kube: kubeapi.Kube) -> Iterator[slices.Publisher]:
    p = slices.Publisher(kube, node=NODE, driver=DRIVER, backoff_max=0.5)
    p.start()
    yield p
    p.stop()


def ours(api: TestApiServer) -> List[Dict[str, Any]]:
    return [
        s
        for s in api.list("resourceslices")
        if s["spec"].get("nodeName") == NODE and s["spec"]["driver"] == DRIVER
    ]


def devices(api: TestApiServer) -> Dict[str, Dict[str, Any]]:
    return {d["name"]: d for s in ours(api) for d in s["spec"].get("devices") or []}


def generations(api: TestApiServer) -> List[int]:
    return sorted(s["spec"]["pool"]["generation"] for s in ours(api))


def published(p: slices.Publisher, timeout: float = 10.0) -> None:
    assert p.wait_in_sync(timeout), p.state()


def test_nothing_before_the_first_update(api: TestApiServer, publisher: slices.Publisher) -> None:
    wait_for(lambda: publisher.state()["synced"], 5, "the watcher listed")
    time.sleep(0.2)
    assert ours(api) == [] and api.count("POST", "/resourceslices") == 0
    publisher.update([])
    published(publisher)
    (empty,) = ours(api)  # DRA is on with no NICs: one empty slice says so
    assert empty["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 1}
    assert "devices" not in empty["spec"] or empty["spec"]["devices"] == []


def test_published_shape(api: TestApiServer, publisher: slices.Publisher) -> None:
    publisher.update([dra(i, numa=i % 2) for i in range(130)])
    published(publisher)
    got = ours(api)
    assert sorted(len(s["spec"]["devices"]) for s in got) == [2, 64, 64]
    node_uid = (api.get("nodes", NODE) or {})["metadata"]["uid"]
    for s in got:
        assert s["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 3}
        assert s["spec"]["nodeName"] == NODE and s["spec"]["driver"] == DRIVER
        assert s["metadata"]["name"].startswith(f"{NODE}-{DRIVER}-")
        assert s["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node_uid, "controller": True}
        ]
    names = [
        d["name"]
        for s in sorted(got, key=lambda s: s["spec"]["devices"][0]["name"])
        for d in s["spec"]["devices"]
    ]
    assert names == sorted(names) and len(set(names)) == 130
    dev = devices(api)["pci-0000-01-05-0"]
    assert dev["attributes"] == {
        "pciAddress": {"string": "0000:01:05.0"},
        "resource.kubernetes.io/pciBusID": {"string": "0000:01:05.0"},
        "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
        "pool": {"string": "kernel.org/virt"},
        "numaNode": {"int": 1},
        "macAddress": {"string": "52:54:00:00:00:05"},
        "ifName": {"string": "ens9"},
        "vendorID": {"string": "0x1af4"},
        "deviceID": {"string": "0x1041"},
    }
    assert "taints" not in dev
    assert api.unknown_fields == []
    assert publisher.state()["writes"] == 3


def test_unknown_facts_are_left_out(api: TestApiServer, publisher: slices.Publisher) -> None:
    bare = dra(0, ifname=None, mac=None, numa=None)
    publisher.update([bare])
    published(publisher)
    attrs = devices(api)[bare.name]["attributes"]
    assert "numaNode" not in attrs and "ifName" not in attrs and "macAddress" not in attrs


def test_hot_plug_and_unplug_bump_the_generation(
    api: TestApiServer, publisher: slices.Publisher
) -> None:
    publisher.update([dra(i) for i in range(70)])
    published(publisher)
    assert generations(api) == [1, 1]
    publisher.update([dra(i) for i in range(71)])  # hot-plug
    published(publisher)
    assert generations(api) == [2, 2]  # one change, one generation, every slice
    assert dra(70).name in devices(api)
    publisher.update([dra(i) for i in range(71) if i != 3])  # unplug
    published(publisher)
    assert generations(api) == [3, 3] and dra(3).name not in devices(api)
    publisher.update([dra(i) for i in range(10)])  # down to one slice: the other is deleted
    published(publisher)
    assert len(ours(api)) == 1 and generations(api) == [4]
    assert ours(api)[0]["spec"]["pool"]["resourceSliceCount"] == 1
    writes = publisher.state()["writes"]
    publisher.update([dra(i) for i in range(10)])  # the same list again: nothing to do
    time.sleep(0.2)
    assert publisher.state()["writes"] == writes


def test_taints_and_their_time(api: TestApiServer, publisher: slices.Publisher) -> None:
    publisher.update([dra(0), dra(1)])
    published(publisher)
    publisher.update([dra(0, problem=NO_CARRIER), dra(1)])
    published(publisher)
    (taint,) = devices(api)[dra(0).name]["taints"]
    assert taint["key"] == f"{DRIVER}/no-carrier" and taint["effect"] == "NoSchedule"
    first_time = taint["timeAdded"]
    time.sleep(1.1)  # timeAdded has whole seconds: a new one would differ now
    publisher.update([dra(0, problem=NO_CARRIER), dra(1), dra(2)])  # another change
    published(publisher)
    assert devices(api)[dra(0).name]["taints"][0]["timeAdded"] == first_time
    publisher.update([dra(0), dra(1), dra(2)])  # carrier back
    published(publisher)
    assert "taints" not in devices(api)[dra(0).name]
    publisher.update([dra(0), dra(1, problem=NO_NETDEV, ifname=None, mac=None), dra(2)])
    published(publisher)
    dev = devices(api)[dra(1).name]
    assert [t["key"] for t in dev["taints"]] == [f"{DRIVER}/no-netdev"]
    # Its host name and MAC are remembered while the netdev is away (e.g. in a pod).
    assert dev["attributes"]["ifName"] == {"string": "ens5"}
    assert dev["attributes"]["macAddress"] == {"string": "52:54:00:00:00:01"}


def test_many_tainted_devices_fit(api: TestApiServer, publisher: slices.Publisher) -> None:
    """A taint lowers the API's limit to 64 devices per slice: 64 is what is published."""
    publisher.update([dra(i, problem=NO_CARRIER) for i in range(128)])
    published(publisher)
    assert sorted(len(s["spec"]["devices"]) for s in ours(api)) == [64, 64]


def test_outside_delete_and_edit_are_repaired(
    api: TestApiServer, publisher: slices.Publisher
) -> None:
    publisher.update([dra(i) for i in range(3)])
    published(publisher)
    (s,) = ours(api)
    api.delete("resourceslices", s["metadata"]["name"])
    wait_for(lambda: len(ours(api)) == 1 and len(devices(api)) == 3, 5, "slice re-created")
    assert generations(api) == [2]
    (s,) = ours(api)
    s["spec"]["devices"][0]["attributes"]["pool"] = {"string": "tampered"}
    api.update("resourceslices", s)
    wait_for(
        lambda: devices(api)[dra(0).name]["attributes"]["pool"] == {"string": "kernel.org/virt"},
        5,
        "edit reverted",
    )
    # A stray slice of ours (same node and driver) is removed.
    stray = json.loads(json.dumps(s))
    stray["metadata"] = {"name": "stray"}
    api.create("resourceslices", stray)
    wait_for(lambda: len(ours(api)) == 1, 5, "stray slice deleted")
    published(publisher)
    assert len(devices(api)) == 3


def test_kubelet_wipe_is_republished(
    api: TestApiServer, kube: kubeapi.Kube, publisher: slices.Publisher
) -> None:
    """The kubelet deletes a node's slices at its start (and a driver's slices 30 s after the
    plugin went): the publisher puts them back."""
    publisher.update([dra(i) for i in range(70)])
    published(publisher)
    kube.resource().delete_collection_resource_slice(
        field_selector=f"spec.nodeName={NODE}", _request_timeout=kube.timeout
    )
    wait_for(lambda: len(devices(api)) == 70, 5, "slices republished")
    assert generations(api)[0] >= 1 and len(set(generations(api))) == 1


def test_conflict_is_retried(api: TestApiServer, publisher: slices.Publisher) -> None:
    publisher.update([dra(0)])
    published(publisher)
    (s,) = ours(api)
    api.conflict_next("resourceslices", s["metadata"]["name"])
    before = api.count("PUT", "/resourceslices/")
    publisher.update([dra(0), dra(1)])
    published(publisher)
    assert dra(1).name in devices(api)
    assert api.count("PUT", "/resourceslices/") - before == 2  # the 409, then the retry
    assert (api.get("resourceslices", s["metadata"]["name"]) or {})["metadata"]["labels"]


def test_unreachable_api_then_back(api: TestApiServer, publisher: slices.Publisher) -> None:
    publisher.update([dra(0)])
    published(publisher)
    api.down()
    publisher.update([dra(0), dra(1)])
    wait_for(lambda: publisher.state()["last_error"], 5, "the failure is reported")
    assert "unreachable" in publisher.state()["last_error"]
    assert not publisher.state()["in_sync"]
    api.up()
    published(publisher, timeout=10)
    assert set(devices(api)) == {dra(0).name, dra(1).name}
    assert publisher.state()["last_error"] is None


def test_slow_api_times_out_and_recovers(api: TestApiServer, kube: kubeapi.Kube) -> None:
    fast_timeout = kubeapi.Kube(client=kube.client, timeout=(1.0, 0.5), source=kube.source)
    p = slices.Publisher(fast_timeout, node=NODE, backoff_max=0.5)
    p.start()
    try:
        wait_for(lambda: p.state()["synced"], 5, "listed")
        api.slow = 1.0
        p.update([dra(0)])
        wait_for(lambda: p.state()["last_error"], 10, "a timeout is reported")
        api.slow = 0.0
        published(p)
        assert dra(0).name in devices(api)
    finally:
        api.slow = 0.0
        p.stop()


def test_expired_watch_lists_again(api: TestApiServer, kube: kubeapi.Kube) -> None:
    api.bookmarks = False  # so the version it goes on from is its last event's
    p = slices.Publisher(kube, node=NODE, watch_seconds=1, backoff_max=0.5)
    p.start()
    try:
        p.update([dra(0)])
        published(p)
        lists = api.count("GET", "/resourceslices", "fieldSelector")
        api.create("nodes", {"metadata": {"name": "unrelated"}})  # the revision moves on
        api.compact()  # and history up to now is gone: the next watch from its version is 410
        wait_for(
            lambda: api.count("GET", "/resourceslices", "fieldSelector") > lists + 1,
            5,
            "a new list after 410",
        )
        (s,) = ours(api)
        api.delete("resourceslices", s["metadata"]["name"])  # still watched after the relist
        wait_for(lambda: dra(0).name in devices(api), 5, "repaired after the relist")
    finally:
        p.stop()


def test_restart_adopts_what_is_published(api: TestApiServer, kube: kubeapi.Kube) -> None:
    first = slices.Publisher(kube, node=NODE)
    first.start()
    nics = [dra(0, problem=NO_CARRIER), dra(1)]
    first.update(nics)
    published(first)
    first.stop()  # slices stay
    assert len(ours(api)) == 1
    time.sleep(1.1)
    second = slices.Publisher(kube, node=NODE)
    second.start()
    try:
        second.update(nics)
        published(second)
        assert second.state()["writes"] == 0  # same NICs, same taint time: nothing to write
        assert generations(api) == [1]
    finally:
        second.stop()


def test_idle_means_no_requests(api: TestApiServer, publisher: slices.Publisher) -> None:
    publisher.update([dra(i) for i in range(256)])
    published(publisher)
    time.sleep(0.3)
    before = len(api.requests)
    for _ in range(20):
        publisher.update([dra(i) for i in range(256)])  # the daemon after every event batch
    time.sleep(1.0)  # the watch stays open (bookmarks every 0.2 s here); nothing is polled
    assert len(api.requests) == before, api.requests[before:]


def test_refused_slice_is_reported_not_spun(kube: kubeapi.Kube, api: TestApiServer) -> None:
    p = slices.Publisher(kube, node=NODE, driver="Not_A_Driver", backoff_max=0.5)
    p.start()
    try:
        p.update([dra(0)])
        wait_for(lambda: p.state()["last_error"], 5, "the refusal is reported")
        assert "422" in p.state()["last_error"] and "spec.driver" in p.state()["last_error"]
        posts = api.count("POST", "/resourceslices")
        time.sleep(1.0)  # retried at the slowest pace (0.5 s here), not in a loop
        assert api.count("POST", "/resourceslices") - posts <= 3
    finally:
        p.stop()


def test_missing_node_is_retried(api: TestApiServer, kube: kubeapi.Kube) -> None:
    p = slices.Publisher(kube, node="node-late", backoff_max=0.5)
    p.start()
    try:
        p.update([dra(0)])
        wait_for(lambda: p.state()["last_error"], 5, "the missing Node is reported")
        assert "404" in p.state()["last_error"]
        api.create("nodes", {"metadata": {"name": "node-late"}})
        published(p)
        (s,) = (x for x in api.list("resourceslices") if x["spec"]["nodeName"] == "node-late")
        assert s["metadata"]["ownerReferences"][0]["name"] == "node-late"
    finally:
        p.stop()


def test_device_names_match_the_contract() -> None:
    assert dra(0).name == "pci-0000-01-00-0" and pci(33) == "0000:02:01.0"


def test_server_without_device_taints(api: TestApiServer, publisher: slices.Publisher) -> None:
    """Kubernetes 1.34/1.35 by default (DRADeviceTaints off) drops taints from what it stores:
    a NIC with a problem is left out instead, and nothing is rewritten in a loop."""
    api.gates["DRADeviceTaints"] = False
    publisher.update([dra(0), dra(1)])
    published(publisher)
    publisher.update([dra(0, problem=NO_CARRIER), dra(1)])
    published(publisher)
    assert set(devices(api)) == {dra(1).name} and publisher.taints_supported is False
    writes = publisher.state()["writes"]
    time.sleep(0.5)
    assert publisher.state()["writes"] == writes
    publisher.update([dra(0), dra(1)])  # carrier back: offered again
    published(publisher)
    assert set(devices(api)) == {dra(0).name, dra(1).name}
