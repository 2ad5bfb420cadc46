"""The test kubelet behaves as kubernetes' device manager does, and virtdp-serve copes with it:
Register's checks, stopped endpoints, the grace period, restarts keeping allocations, the
checkpoint, and the order-free lists the kubelet sends."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent import futures

import grpc
import pytest
from testkubelet import AllocationFailed, TestKubelet, go_join, is_extended_resource_name

from virtcore import checkpoint, pools
from virtcore.kubelet import deviceplugin_pb2 as pb
from virtcore.kubelet import deviceplugin_pb2_grpc as pbg
from virtcore.kubelet import registration

RES = "kernel.org/virt"
A, B, C = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0"


@pytest.mark.parametrize(
    "name, ok",
    [
        ("kernel.org/virt", True),
        ("example.com/fast-net_1.x", True),
        ("virt", False),  # native (no domain)
        ("kubernetes.io/virt", False),
        ("a.kubernetes.io/virt", False),
        ("xkubernetes.io/virt", False),  # "kubernetes.io/" anywhere is native
        ("requests.example.com/x", False),
        ("example.com/a/b", False),
        ("Example.com/x", False),
        ("example.com/x\n", False),  # Go's $ does not match before a trailing newline
        ("example.com/-x", False),
        ("example.com/" + "x" * 63, True),
        ("example.com/" + "x" * 64, False),
        ("a" * 244 + "/x", True),  # "requests." + domain must fit 253
        ("a" * 245 + "/x", False),
    ],
)
def test_resource_name_rule_matches_the_kubelet(name, ok):
    assert is_extended_resource_name(name) is ok
    # virtdp's config check agrees, so a name the kubelet refuses fails at config load.
    text = json.dumps({"pools": [{"resourceName": name}]})
    try:
        pools.parse_config(text, "pools.yaml")
        accepted = True
    except pools.ConfigError:
        accepted = False
    assert accepted is ok


def test_endpoint_joined_like_go():
    assert go_join("/d/dp/", "x.sock") == "/d/dp/x.sock"
    assert go_join("/d/dp", "/tmp/x.sock") == "/d/dp/tmp/x.sock"
    assert go_join("/d/dp", "sub/../x.sock") == "/d/dp/x.sock"


class _MiniPlugin(pbg.DevicePluginServicer):
    """A bare plugin to drive the test kubelet where virtdp-serve cannot (wrong answers)."""

    def __init__(self, path, devices, *, options=None, alloc_responses=1, preferred=None):
        self.devices = devices
        self.options = options or pb.DevicePluginOptions()
        self.alloc_responses = alloc_responses
        self.preferred_answer = preferred
        self.requests = []
        self.stop_streams = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pbg.add_DevicePluginServicer_to_server(self, self.server)
        assert self.server.add_insecure_port("unix://" + path)
        self.server.start()

    def GetDevicePluginOptions(self, request, context):  # noqa: N802
        return self.options

    def ListAndWatch(self, request, context):  # noqa: N802
        yield pb.ListAndWatchResponse(
            devices=[pb.Device(ID=d, health="Healthy") for d in self.devices]
        )
        while context.is_active() and not self.stop_streams.wait(0.05):
            pass

    def GetPreferredAllocation(self, request, context):  # noqa: N802
        self.requests.append(("preferred", request))
        ids = self.preferred_answer or []
        return pb.PreferredAllocationResponse(
            container_responses=[pb.ContainerPreferredAllocationResponse(deviceIDs=ids)]
        )

    def Allocate(self, request, context):  # noqa: N802
        self.requests.append(("allocate", request))
        return pb.AllocateResponse(
            container_responses=[pb.ContainerAllocateResponse()] * self.alloc_responses
        )

    def PreStartContainer(self, request, context):  # noqa: N802
        self.requests.append(("prestart", request))
        return pb.PreStartContainerResponse()


def _register(kubelet, endpoint, resource=RES, version="v1beta1"):
    registration.register(
        kubelet.socket_path, endpoint=endpoint, resource_name=resource, options=None
    )


@pytest.fixture
def bench(lab):
    lab.kubelet.start()
    yield lab
    for p in getattr(lab, "_minis", []):
        p.server.stop(None)


def _mini(lab, name, devices, **kw):
    plugin = _MiniPlugin(str(lab.plugin_dir / name), devices, **kw)
    lab.__dict__.setdefault("_minis", []).append(plugin)
    return plugin


def test_register_refusals_carry_the_kubelets_messages(bench):
    k = bench.kubelet
    with pytest.raises(registration.RegistrationError) as e:
        _register(k, "p.sock", resource="kubernetes.io/virt")
    assert 'the ResourceName "kubernetes.io/virt" is invalid' in str(e.value)
    assert e.value.code == grpc.StatusCode.UNKNOWN
    # Nothing serves on the endpoint: the kubelet dials for 10 s, then refuses.
    started = time.monotonic()
    with pytest.raises(registration.RegistrationError) as e:
        _register(k, "absent.sock")
    assert 9 < time.monotonic() - started < 12.5
    assert "failed to dial device plugin" in str(e.value)
    assert RES not in k.endpoints


def test_old_stream_ending_after_reregistration_stops_the_new_endpoint(bench):
    """PluginDisconnected works by resource name: an old stream that ends after a new Register
    stops the new endpoint, which then refuses to allocate. A plugin must end its old stream
    before it registers again."""
    k = bench.kubelet
    old = _mini(bench, "old.sock", [A])
    _register(k, "old.sock")
    k.wait_registered(RES)
    new = _mini(bench, "new.sock", [A, B])
    _register(k, "new.sock")
    k.wait_health(RES, {A: "Healthy", B: "Healthy"})
    old.server.stop(None).wait(5)
    k.wait(lambda: k.endpoints[RES].stop_time is not None, 5, "new endpoint stopped")
    assert k.health(RES) == {A: "Unhealthy", B: "Unhealthy"}
    with pytest.raises(AllocationFailed, match="no healthy devices"):
        k.allocate(RES, 1)
    with k._cond:  # even with healthy devices, a stopped endpoint refuses
        for d in k.devices[RES].values():
            d.health = "Healthy"
    with pytest.raises(AllocationFailed, match="has been stopped"):
        k.allocate(RES, 1)
    assert not [r for r in new.requests if r[0] == "allocate"]


def test_grace_period_then_capacity_drops(bench):
    k = bench.kubelet
    plugin = _mini(bench, "p.sock", [A, B])
    _register(k, "p.sock")
    k.wait_registered(RES)
    assert k.capacity() == ({RES: 2}, {RES: 2}, [])
    plugin.server.stop(None).wait(5)
    k.wait(lambda: k.endpoints[RES].stop_time is not None, 5, "endpoint stopped")
    assert k.capacity() == ({RES: 2}, {RES: 0}, [])  # still counted, unhealthy
    k.grace = 0.2
    time.sleep(0.3)
    assert k.capacity() == ({}, {}, [RES])
    assert RES not in k.endpoints


def test_preferred_answer_of_wrong_size_and_response_count(bench):
    k = bench.kubelet
    opts = pb.DevicePluginOptions(get_preferred_allocation_available=True)
    plugin = _mini(bench, "p.sock", [A, B, C], options=opts, preferred=[A, B, "bogus"])
    _register(k, "p.sock")
    k.wait_registered(RES)
    ids, _ = k.allocate(RES, 1, owner="p1/c")
    assert ids[0] in (A, B)  # a subset of the answer, never an unknown ID
    kind, req = plugin.requests[0]
    assert kind == "preferred"
    [creq] = req.container_requests
    assert sorted(creq.available_deviceIDs) == [A, B, C]
    assert list(creq.must_include_deviceIDs) == [] and creq.allocation_size == 1
    # Too short an answer: the kubelet fills up from the rest.
    plugin.preferred_answer = []
    ids2, _ = k.allocate(RES, 2, owner="p2/c")
    assert sorted(ids + ids2) == [A, B, C]
    # No container response: refused; two: the first one counts.
    k.release(RES, "p2/c")
    plugin.alloc_responses = 0
    with pytest.raises(AllocationFailed, match="no containers return"):
        k.allocate(RES, 1, owner="p3/c")
    plugin.alloc_responses = 2
    k.allocate(RES, 1, owner="p3/c")


def test_prestart_only_when_asked(bench):
    k = bench.kubelet
    plain = _mini(bench, "p.sock", [A])
    _register(k, "p.sock")
    k.wait_registered(RES)
    k.allocate(RES, 1, owner="p/c")
    assert k.prestart(RES, "p/c") is None
    assert not [r for r in plain.requests if r[0] == "prestart"]
    other = "example.com/pre"
    pre = _mini(bench, "q.sock", [B], options=pb.DevicePluginOptions(pre_start_required=True))
    _register(k, "q.sock", resource=other)
    k.wait_registered(other)
    k.allocate(other, 1, owner="p/c")
    assert k.prestart(other, "p/c") is not None
    [(_, req)] = [r for r in pre.requests if r[0] == "prestart"]
    assert list(req.devices_ids) == [B]


def test_daemon_rejects_a_name_the_kubelet_refuses(lab):
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.write_config("pools:\n  - resourceName: example.kubernetes.io/virt\n")
    res = lab.run(config=True)
    assert res.returncode == 2, res.stderr
    assert f"{lab.config_path}: pools[0].resourceName" in res.stderr
    assert "reserved for Kubernetes" in res.stderr and "expected <domain>/<name>" in res.stderr
    assert not lab.kubelet.registrations


def test_socket_deleted_repeatedly_new_endpoint_stays_live(lab):
    """virtdp-serve re-serves after its socket vanishes; its old stream must be gone before it
    registers again, or the kubelet stops (and before 1.3x disconnects) the new endpoint."""
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    for i in range(5):
        n = len(lab.kubelet.registrations)
        os.unlink(lab.socket_path(RES))
        lab.kubelet.wait(lambda n=n: len(lab.kubelet.registrations) > n, 5, "a new Register")
        lab.kubelet.wait_registered(RES)
        time.sleep(0.3)  # a late disconnect of the old stream would show by now
        assert lab.kubelet.active(RES), f"round {i}: endpoint stopped after re-registration"
        ids, _ = lab.kubelet.allocate(RES, 1, owner=f"p{i}/c")
        assert ids == [A]
        lab.kubelet.release(RES, f"p{i}/c")


def test_restart_keeps_allocations_and_checkpoint_is_the_kubelets(lab):
    lab.kubelet = TestKubelet(str(lab.plugin_dir), checkpoint=True)
    lab.add_nic(A, "ens10", numa_node=0)
    lab.add_nic(B, "ens11")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_health(RES, {A: "Healthy", B: "Healthy"})
    ids, resp = lab.kubelet.allocate(RES, 1, owner="uid-1/app")
    path = str(lab.plugin_dir / "kubelet_internal_checkpoint")
    cp = checkpoint.load(path)
    [entry] = cp.entries
    assert (entry.pod_uid, entry.container_name, entry.resource_name) == ("uid-1", "app", RES)
    assert [d.id for d in entry.devices] == ids
    assert entry.devices[0].numa_node == (0 if ids == [A] else -1)
    raw = json.loads(open(path).read())
    assert sorted(raw["Data"]["RegisteredDevices"][RES]) == [A, B]

    lab.kubelet.restart()
    # Until the plugin is back: known resource, stopped endpoint, no devices, allocation kept.
    assert lab.kubelet.allocated[RES] == {ids[0]: "uid-1/app"}
    lab.kubelet.wait_registered(RES, timeout=5)
    more, _ = lab.kubelet.allocate(RES, 1, owner="uid-2/app")
    assert more != ids and sorted(ids + more) == [A, B]
    with pytest.raises(AllocationFailed, match="Requested: 1, Available: 0"):
        lab.kubelet.allocate(RES, 1, owner="uid-3/app")
    assert len(checkpoint.load(path).entries) == 2


def test_stopped_placeholder_right_after_restart(lab):
    lab.add_nic(A, "ens10")
    lab.kubelet.start()
    lab.start()
    lab.kubelet.wait_registered(RES)
    lab.kubelet.stop()
    lab.kubelet.start()  # a new kubelet: the resource is known, its endpoint stopped
    ep = lab.kubelet.endpoints.get(RES)
    assert ep is not None
    if ep.stop_time is not None:  # the daemon may already be back
        with pytest.raises(AllocationFailed):
            lab.kubelet.allocate(RES, 1)
    lab.kubelet.wait_registered(RES, timeout=5)
    ids, _ = lab.kubelet.allocate(RES, 1)
    assert ids == [A]
