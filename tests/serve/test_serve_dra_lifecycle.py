"""The DRA driver across restarts: of the daemon (claims prepared), of the kubelet, and with its
sockets or the kubelet's directories deleted under it."""

from __future__ import annotations

import shutil

import pytest
from conftest import DRIVER, NODE

from virtcore import claims
from virtcore.kubelet import dra_pb2, dra_pb2_grpc

A, B = "0000:00:0a.0", "0000:00:0b.0"
DEV_A, DEV_B = claims.device_name(A), claims.device_name(B)
POD = "pod-uid-1"


def _registered_again(lab, before: int) -> None:
    lab.dra_kubelet.wait(
        lambda: sum(r.registered for r in lab.dra_kubelet.registrations) > before
        and bool(lab.dra_kubelet.plugins.get(DRIVER)),
        10,
        "a new registration",
    )


def _registrations(lab) -> int:
    return sum(r.registered for r in lab.dra_kubelet.registrations)


def test_daemon_restart_with_claims_prepared(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    claim = lab.claim("c1", [A], pods=[(POD, "web")])
    uid = claim["metadata"]["uid"]
    lab.dra_kubelet.prepare(POD, [claim])
    lab.move_to_pod(A, "ens10")  # ehost-device plumbed it
    record = (lab.dra_state_dir / "claims.json").read_bytes()

    n = _registrations(lab)
    assert lab.signal()[0] == 0
    lab.dra_kubelet.wait(lambda: not lab.dra_kubelet.plugins, 5, "deregistration")
    lab.start(*lab.dra_args())
    _registered_again(lab, n)
    assert (lab.dra_state_dir / "claims.json").read_bytes() == record
    lab.wait_log("DRA: 1 prepared claims in")
    # The NIC in the pod is the claim's, not a NIC without netdev.
    lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_A, "Healthy")
    lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_B, "Healthy")
    # The kubelet repeats a prepare it lost the answer of: the same devices, also without API.
    lab.api.down()
    stub = dra_pb2_grpc.DRAPluginStub(lab.dra_kubelet.plugin(DRIVER).channel)
    resp = stub.NodePrepareResources(
        dra_pb2.NodePrepareResourcesRequest(
            claims=[dra_pb2.Claim(namespace="default", uid=uid, name="c1")]
        ),
        timeout=30,
    )
    assert resp.claims[uid].error == ""
    assert [(d.pool_name, d.device_name) for d in resp.claims[uid].devices] == [(NODE, DEV_A)]
    lab.api.up()
    # Another claim cannot take the NIC the restarted daemon knows is held.
    from testkubeletdra import DraError

    other = lab.claim("c2", [A], pods=[("pod-uid-2", "other")])
    with pytest.raises(DraError, match="is held by prepared claim default/c1"):
        lab.dra_kubelet.prepare("pod-uid-2", [other])
    lab.dra_kubelet.unprepare(POD, "default", ["c1"])
    assert lab.record() == {}


def test_kubelet_restart_registers_again_and_keeps_claims(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    claim = lab.claim("c1", [A])
    lab.dra_kubelet.prepare(POD, [claim])
    for _ in range(3):
        n = _registrations(lab)
        lab.dra_kubelet.restart()
        _registered_again(lab, n)
        lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_A, "Healthy")
    # The sockets were never replaced: a new kubelet registers the plugin by itself.
    assert "is gone; serving again" not in lab.log()
    lab.dra_kubelet.unprepare(POD, "default", ["c1"])
    assert lab.record() == {}


def test_registration_socket_deleted_is_served_again(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    n = _registrations(lab)
    lab.registration_socket.unlink()
    _registered_again(lab, n)
    lab.wait_log("DRA: registration socket")
    assert lab.registration_socket.exists()


def test_kubelet_restart_with_a_wiped_registry_directory(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    lab.dra_kubelet.stop()
    shutil.rmtree(lab.registry_dir)
    n = _registrations(lab)
    lab.dra_kubelet.start()  # creates the directory again (MkdirAll), as the kubelet does
    _registered_again(lab, n)
    assert lab.registration_socket.exists()
    claim = lab.claim("c1", [A])
    lab.dra_kubelet.prepare(POD, [claim])


def test_endpoint_deleted_is_served_again_and_registered_anew(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    n = _registrations(lab)
    lab.dra_socket.unlink()
    _registered_again(lab, n)
    lab.wait_log("DRA: endpoint")
    assert lab.dra_socket.exists()
    claim = lab.claim("c1", [A])
    lab.dra_kubelet.prepare(POD, [claim])
    assert len(lab.record()) == 1
