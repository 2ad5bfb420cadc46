"""virtdp-serve as a DRA driver, driven by the test kubelet (plugin watcher, DRA manager) over
real gRPC on unix sockets, claims read from the test API server: registration, prepare before
the sandbox, unprepare after, the claim record, health, and the modes."""

from __future__ import annotations

import json
import os

import pytest
from conftest import DRIVER, NODE
from testkubeletdra import TestDraKubelet

from virtcore import claims

A, B = "0000:00:0a.0", "0000:00:0b.0"
DEV_A, DEV_B = claims.device_name(A), claims.device_name(B)
POD = "pod-uid-1"


def _names(devices):
    return [
        (list(d.request_names), d.pool_name, d.device_name, list(d.cdi_device_ids)) for d in devices
    ]


def test_registers_through_the_plugin_watcher(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args(), metrics=True)
    lab.wait_log("DRA: serving registration")
    lab.dra_kubelet.start()
    plugin = lab.dra_kubelet.wait_registered(DRIVER)
    rec = lab.dra_kubelet.registrations[-1]
    assert rec.registered and rec.error == ""
    assert (rec.info.type, rec.info.name) == ("DRAPlugin", DRIVER)
    assert rec.info.endpoint == str(lab.dra_socket)
    assert list(rec.info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    assert rec.socket == str(lab.registration_socket)
    assert plugin.service == "v1.DRAPlugin"
    lab.wait_log("DRA: registered with the kubelet as driver virt.kernel.org")
    assert lab.http("/readyz") == (200, "ready: DRA driver virt.kernel.org registered\n")
    assert lab.metric("virtdp_dra_registered") == 1.0
    # DRA only: nothing for the device-plugin kubelet.
    assert list(lab.plugin_dir.iterdir()) == []


def test_prepare_before_sandbox_and_unprepare_after(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.start(*lab.dra_args(), metrics=True)
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    cfg = [
        {
            "source": "FromClaim",
            "requests": ["nic"],
            "opaque": {"driver": DRIVER, "parameters": {"interfaceName": "net7"}},
        }
    ]
    claim = lab.claim("web-nic", [A], config=cfg, pods=[(POD, "web")])
    uid = claim["metadata"]["uid"]

    got = lab.dra_kubelet.prepare(POD, [claim])
    assert _names(got[uid]) == [(["nic"], NODE, DEV_A, [])]
    rec = lab.record()
    assert list(rec) == [uid]
    c = rec[uid]
    assert (c.namespace, c.name, c.driver) == ("default", "web-nic", DRIVER)
    assert c.pods == (claims.PodRef(POD, "default", "web"),)
    assert c.devices == (claims.ClaimedDevice("nic", NODE, DEV_A, A, "net7"),)
    doc = json.loads((lab.dra_state_dir / "claims.json").read_text())
    assert (doc["driver"], doc["node"]) == (DRIVER, NODE)
    assert lab.metric("virtdp_dra_prepared_claims") == 1.0
    assert lab.metric('virtdp_dra_claims_total{call="prepare",result="ok"}') == 1.0

    lab.dra_kubelet.unprepare(POD, "default", ["web-nic"])
    assert lab.record() == {}
    assert lab.metric("virtdp_dra_prepared_claims") == 0.0
    assert [m for _, m, _ in lab.dra_kubelet.calls] == [
        "NodePrepareResources",
        "NodeUnprepareResources",
    ]


def test_prepare_is_idempotent_and_unprepare_of_unknown_claims_succeeds(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    plugin = lab.dra_kubelet.wait_registered(DRIVER)
    claim = lab.claim("c1", [A])
    uid = claim["metadata"]["uid"]
    from virtcore.kubelet import dra_pb2, dra_pb2_grpc

    stub = dra_pb2_grpc.DRAPluginStub(plugin.channel)
    req = dra_pb2.NodePrepareResourcesRequest(
        claims=[dra_pb2.Claim(namespace="default", uid=uid, name="c1")]
    )
    first = stub.NodePrepareResources(req, timeout=10)
    before = (lab.dra_state_dir / "claims.json").read_bytes()
    second = stub.NodePrepareResources(req, timeout=10)
    assert first == second and not first.claims[uid].error
    assert (lab.dra_state_dir / "claims.json").read_bytes() == before
    un = dra_pb2.NodeUnprepareResourcesRequest(
        claims=[dra_pb2.Claim(namespace="default", uid=uid, name="c1")]
    )
    assert stub.NodeUnprepareResources(un, timeout=10).claims[uid].error == ""
    again = stub.NodeUnprepareResources(un, timeout=10)
    assert uid in again.claims and again.claims[uid].error == ""
    assert lab.record() == {}


def test_v1beta1_kubelet_gets_the_same_service(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet = TestDraKubelet(
        str(lab.registry_dir), services=("v1beta1.DRAPlugin",), api=lab.api, node=NODE
    )
    lab.dra_kubelet.start()
    assert lab.dra_kubelet.wait_registered(DRIVER).service == "v1beta1.DRAPlugin"
    claim = lab.claim("c1", [A])
    got = lab.dra_kubelet.prepare(POD, [claim])
    assert _names(got[claim["metadata"]["uid"]]) == [(["nic"], NODE, DEV_A, [])]
    lab.dra_kubelet.unprepare(POD, "default", ["c1"])
    assert lab.record() == {}


def test_kubelet_without_a_common_service_is_refused_and_not_ready(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args(), metrics=True)
    lab.dra_kubelet = TestDraKubelet(
        str(lab.registry_dir), services=("v2.DRAPlugin",), api=lab.api, node=NODE
    )
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait(lambda: lab.dra_kubelet.registrations, 10, "a registration attempt")
    assert not lab.dra_kubelet.registrations[-1].registered
    lab.wait_log("DRA: the kubelet refused the registration of virt.kernel.org")
    code, body = lab.http("/readyz")
    assert code == 503 and "DRA driver virt.kernel.org" in body


def test_health_follows_carrier(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    h = lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_A, "Healthy")
    assert h.timeout == 3600 and h.message == ""
    assert lab.dra_kubelet.device_health(DRIVER, NODE, DEV_B) == "Healthy"
    lab.cable("ens10", False)
    h = lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_A, "Unhealthy", timeout=5)
    assert h.message == "no carrier on the NIC's link"
    assert lab.dra_kubelet.device_health(DRIVER, NODE, DEV_B) == "Healthy"
    lab.cable("ens10", True)
    lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_A, "Healthy", timeout=5)


def test_a_nic_without_its_netdev_is_unhealthy_unless_a_claim_holds_it(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    claim = lab.claim("c1", [A])
    lab.dra_kubelet.prepare(POD, [claim])
    lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_A, "Healthy")
    # ehost-device moves the claimed NIC into the pod: still healthy (held, in the pod).
    lab.move_to_pod(A, "ens10")
    # A spare NIC whose netdev vanished from the node: unhealthy, "no netdev".
    lab.move_to_pod(B, "ens11")
    h = lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_B, "Unhealthy", timeout=5)
    assert h.message == "the NIC has no netdev in the node's network namespace"
    assert lab.dra_kubelet.device_health(DRIVER, NODE, DEV_A) == "Healthy"


def test_both_modes_split_pools_no_nic_offered_twice(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    lab.write_config("""
pools:
  - resourceName: kernel.org/virt
    selectors: {pciAddresses: ["0000:00:0a.0"]}
  - resourceName: kernel.org/dra
    selectors: {pciAddresses: ["0000:00:0b.0"]}
""")
    lab.kubelet.start()
    lab.start(*lab.dra_args("both", "--dra-pools", "kernel.org/dra"), config=True, metrics=True)
    lab.kubelet.wait_registered("kernel.org/virt")
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    lab.dra_kubelet.wait_health(DRIVER, NODE, DEV_B, "Healthy")
    assert set(lab.kubelet.endpoints) == {"kernel.org/virt"}
    assert lab.kubelet.health("kernel.org/virt") == {A: "Healthy"}
    with lab.dra_kubelet.lock:
        assert set(lab.dra_kubelet.health[DRIVER]) == {(NODE, DEV_B)}
    # The device plugin's NIC is not the DRA driver's to prepare.
    from testkubeletdra import DraError

    with pytest.raises(DraError, match=f"device {DEV_A} is not a NIC this driver offers"):
        lab.dra_kubelet.prepare(POD, [lab.claim("wrong", [A])])
    lab.dra_kubelet.prepare(POD, [lab.claim("right", [B])])
    assert [d.pci_address for c in lab.record().values() for d in c.devices] == [B]
    code, body = lab.http("/readyz")
    assert code == 200 and body == "ready: 1 pools and DRA driver virt.kernel.org registered\n"


def test_stop_removes_both_sockets_and_keeps_the_record(lab):
    lab.add_nic(A, "ens10")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.start()
    lab.dra_kubelet.wait_registered(DRIVER)
    lab.dra_kubelet.prepare(POD, [lab.claim("c1", [A])])
    assert lab.registration_socket.exists() and lab.dra_socket.exists()
    rc, out = lab.signal()
    assert rc == 0 and out == ""
    assert not lab.registration_socket.exists() and not lab.dra_socket.exists()
    lab.dra_kubelet.wait(lambda: not lab.dra_kubelet.plugins, 5, "deregistration")
    assert len(lab.record()) == 1
    assert sorted(os.listdir(lab.dra_state_dir)) == ["claims.json", "status"]
