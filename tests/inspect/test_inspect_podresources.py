"""The pod-resources v1 client against a real gRPC server on a unix socket (the faithful test
server), and against every way a socket can fail: absent, refusing, a plain file, hung,
speaking something else, not serving the API."""

from __future__ import annotations

import time

import grpc
import pytest
from inspectlab import DevicePluginServer, RawSocketServer, refusing_socket
from testpodresources import Container, Pod, PodResourcesServer

from virtcore.kubelet import channel, podresources

RES = "kernel.org/virt"


def _pods():
    return [
        Pod(
            "web",
            "default",
            "uid-web",
            [
                Container(
                    "app", {RES: {0: ["0000:00:0a.0", "0000:00:0b.0"], -1: ["0000:00:0c.0"]}}
                ),
                Container("sidecar"),
            ],
        ),
        Pod("db", "prod", "uid-db", [Container("main", {"vendor.com/gpu": {1: ["GPU-1"]}})]),
    ]


def test_list_one_group_per_device_with_topology_only_when_known(tmp_path):
    sock = str(tmp_path / "pr.sock")
    with PodResourcesServer(sock, _pods()):
        with podresources.Client(sock, timeout=2) as client:
            pods = client.list()
    web, db = pods
    assert (web.namespace, web.name) == ("default", "web")
    app, sidecar = web.containers
    assert app.devices == (
        podresources.ContainerDevices(RES, ("0000:00:0c.0",), ()),
        podresources.ContainerDevices(RES, ("0000:00:0a.0",), (0,)),
        podresources.ContainerDevices(RES, ("0000:00:0b.0",), (0,)),
    )
    assert sidecar.devices == ()
    assert db.containers[0].devices == (
        podresources.ContainerDevices("vendor.com/gpu", ("GPU-1",), (1,)),
    )  # noqa: E501


def test_list_older_kubelet_grouping_by_numa_node(tmp_path):
    sock = str(tmp_path / "pr.sock")
    with PodResourcesServer(sock, _pods(), grouping="numa"):
        with podresources.Client(sock, timeout=2) as client:
            app = client.list()[0].containers[0]
    assert app.devices == (
        podresources.ContainerDevices(RES, ("0000:00:0c.0",), (-1,)),
        podresources.ContainerDevices(RES, ("0000:00:0a.0", "0000:00:0b.0"), (0,)),
    )


def test_get_and_allocatable_and_the_kubelets_errors(tmp_path):
    sock = str(tmp_path / "pr.sock")
    alloc = {RES: {0: ["0000:00:0a.0"], -1: ["0000:00:0c.0"]}}
    with PodResourcesServer(sock, _pods(), alloc) as server:
        with podresources.Client(sock, timeout=2) as client:
            db = client.get("db", "prod")
            assert db.containers[0].name == "main"
            with pytest.raises(podresources.CallFailed) as err:
                client.get("db", "default")
            assert err.value.code == grpc.StatusCode.UNKNOWN
            assert "Get: UNKNOWN: pod db in namespace default not found" in str(err.value)
            a = client.allocatable()
            assert sorted(i for d in a.devices for i in d.device_ids) == [
                "0000:00:0a.0",
                "0000:00:0c.0",
            ]  # noqa: E501
            server.get_enabled = False
            with pytest.raises(
                podresources.CallFailed, match="PodResources API Get method disabled"
            ):
                client.get("db", "prod")
    assert server.calls == ["Get", "Get", "GetAllocatableResources", "Get"]


def _unavailable(sock: str, timeout: float = 1.0) -> str:
    started = time.monotonic()
    with pytest.raises(podresources.Unavailable) as err:
        with podresources.Client(sock, timeout=timeout) as client:
            client.list()
    # Every failure is bounded by the deadline, whatever the socket does.
    assert time.monotonic() - started < timeout + 1.5
    assert sock in str(err.value)
    return str(err.value)


def test_absent_refusing_plain_file(tmp_path):
    assert "no such socket" in _unavailable(str(tmp_path / "absent.sock"))
    refusing_socket(str(tmp_path / "dead.sock"))
    assert "connection refused (nobody is listening" in _unavailable(str(tmp_path / "dead.sock"))
    (tmp_path / "file").write_text("x")
    assert "is a regular file, not a unix socket" in _unavailable(str(tmp_path / "file"))


def test_hung_socket_fails_within_the_deadline(tmp_path):
    sock = str(tmp_path / "hang.sock")
    with RawSocketServer(sock, "hang"):
        msg = _unavailable(sock, timeout=0.5)
    assert "accepted the connection but sent nothing within 0.5s" in msg


def test_socket_speaking_http1_is_not_grpc(tmp_path):
    sock = str(tmp_path / "http.sock")
    with RawSocketServer(sock, "http1"):
        msg = _unavailable(sock)
    assert "not HTTP/2 (not a gRPC server)" in msg and "HTTP/1.1 400" in msg


def test_grpc_server_without_the_api_is_a_call_failure(tmp_path):
    # A device plugin socket is gRPC but serves no PodResourcesLister.
    sock = str(tmp_path / "plugin.sock")
    with DevicePluginServer(sock, []):
        with pytest.raises(podresources.CallFailed) as err:
            with podresources.Client(sock, timeout=2) as client:
                client.list()
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "List: not implemented by the server" in str(err.value)


def test_server_that_stops_answering_mid_call_hits_the_deadline(tmp_path, monkeypatch):
    sock = str(tmp_path / "pr.sock")
    with PodResourcesServer(sock, _pods()) as server:
        with podresources.Client(sock, timeout=0.5) as client:
            with server.lock:  # the servicer blocks on it: the call cannot be answered
                started = time.monotonic()
                with pytest.raises(podresources.Unavailable, match="List: no answer within 0.5s"):
                    client.list()
                assert time.monotonic() - started < 2


def test_probe_accepts_a_real_grpc_server(tmp_path):
    sock = str(tmp_path / "pr.sock")
    with PodResourcesServer(sock, []):
        channel.probe(sock, 2)  # no exception


def test_list_carries_the_dra_devices_each_container_uses(tmp_path):
    """KubeletPodResourcesDynamicResources (GA in 1.36): per container, its claims and, per
    claim, one ClaimResource per device, with the kubelet's per-driver CDI list."""
    from testpodresources import Claim, DraDevice

    nic = DraDevice("virt.kernel.org", "node-a", "pci-0000-00-0a-0", ["virt.kernel.org/net=a"])
    nic2 = DraDevice("virt.kernel.org", "node-a", "pci-0000-00-0b-0", ["virt.kernel.org/net=b"])
    gpu = DraDevice("gpu.example.com", "node-a", "gpu-0", [], share_id="7c2f")
    pods = [
        Pod(
            "web",
            "default",
            "uid-web",
            [
                Container("app", claims=[Claim("nics", [nic, nic2]), Claim("gpu", [gpu])]),
                Container("sidecar"),
            ],
        )
    ]
    sock = str(tmp_path / "pr.sock")
    with PodResourcesServer(sock, pods):
        with podresources.Client(sock, timeout=2) as client:
            app, sidecar = client.list()[0].containers
            got = client.get("web", "default").containers[0]
    assert sidecar.dynamic_resources == ()
    assert got == app
    nics, gpus = app.dynamic_resources
    assert (nics.claim_namespace, nics.claim_name) == ("default", "nics")
    assert nics.claim_resources == (
        podresources.ClaimResource(
            "virt.kernel.org", "node-a", "pci-0000-00-0a-0", ("virt.kernel.org/net=a",)
        ),
        # The kubelet hands each device of a driver the CDI list built so far.
        podresources.ClaimResource(
            "virt.kernel.org",
            "node-a",
            "pci-0000-00-0b-0",
            ("virt.kernel.org/net=a", "virt.kernel.org/net=b"),
        ),
    )
    assert gpus.claim_resources == (
        podresources.ClaimResource("gpu.example.com", "node-a", "gpu-0", (), share_id="7c2f"),
    )


def test_dra_fields_have_the_kubelets_field_numbers():
    """Wire compatibility with Kubernetes 1.36's podresources v1 api.proto: field numbers, and
    class_name (1) gone from DynamicResource."""
    from virtcore.kubelet import podresources_pb2 as pb

    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.ContainerResources)["dynamic_resources"] == 5
    assert numbers(pb.DynamicResource) == {
        "claim_name": 2,
        "claim_namespace": 3,
        "claim_resources": 4,
    }
    assert numbers(pb.ClaimResource) == {
        "cdi_devices": 1,
        "driver_name": 2,
        "pool_name": 3,
        "device_name": 4,
        "share_id": 5,
    }
    assert pb.ClaimResource.DESCRIPTOR.fields_by_name["share_id"].has_presence
    assert numbers(pb.CDIDevice) == {"name": 1}
