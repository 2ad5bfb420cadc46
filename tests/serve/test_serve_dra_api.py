"""The daemon's API side wired to its inventory and claim record: the node's ResourceSlices
follow hot-plug, unplug and carrier loss (taints), survive the kubelet's wiping, and a NIC's
network status file becomes the claim's status.devices[] entry. Everything runs as shipped:
the daemon in the node namespace, the test API server listening there."""

from __future__ import annotations

from conftest import DRIVER, NODE

from virtcore import claims

A, B = "0000:00:0a.0", "0000:00:0b.0"
DEV_A, DEV_B = claims.device_name(A), claims.device_name(B)
POD = "pod-uid-1"


def _devices(lab):
    """name -> (attributes, taint keys) over this node's slices of the driver."""
    out = {}
    for s in lab.api.list("resourceslices"):
        spec = s["spec"]
        if spec.get("nodeName") != NODE or spec.get("driver") != DRIVER:
            continue
        assert spec["pool"]["name"] == NODE
        for d in spec.get("devices") or []:
            attrs = {k: next(iter(v.values())) for k, v in d.get("attributes", {}).items()}
            out[d["name"]] = (attrs, tuple(t["key"] for t in d.get("taints") or []))
    return out


def _wait(lab, cond, what, timeout=10):
    lab.dra_kubelet.wait(lambda: cond(_devices(lab)), timeout, what)
    return _devices(lab)


def _start(lab, *extra):
    lab.api.create("nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    lab.dra_kubelet.start()
    lab.start(*lab.dra_args("dra", *extra))
    lab.dra_kubelet.wait_registered(DRIVER)


def test_slices_follow_hotplug_unplug_and_carrier(lab):
    lab.add_nic(A, "ens10", numa_node=0)
    _start(lab)
    devs = _wait(lab, lambda d: DEV_A in d, "the first slice")
    attrs, taints = devs[DEV_A]
    assert taints == ()
    assert attrs["pciAddress"] == A and attrs["numaNode"] == 0
    assert attrs["ifName"] == "ens10" and attrs["pool"] == "kernel.org/virt"
    assert attrs["vendorID"] == "0x1af4" and attrs["deviceID"] == "0x1041"
    assert attrs["resource.kubernetes.io/pcieRoot"] == "pci0000:00"

    lab.add_nic(B, "ens11")
    lab.uevent("ens11", "add")
    _wait(lab, lambda d: set(d) == {DEV_A, DEV_B}, "the hot-plugged NIC")

    lab.cable("ens11", False)
    devs = _wait(lab, lambda d: d.get(DEV_B, ({}, ()))[1], "the no-carrier taint")
    assert devs[DEV_B][1] == (f"{DRIVER}/no-carrier",)
    assert devs[DEV_A][1] == ()
    lab.cable("ens11", True)
    _wait(lab, lambda d: d[DEV_B][1] == (), "the taint removed")

    lab.sysfs.remove_nic(A)
    lab.uevent("ens10", "remove")
    _wait(lab, lambda d: set(d) == {DEV_B}, "the unplugged NIC gone")


def test_no_netdev_taint_only_for_nics_no_claim_holds(lab):
    lab.add_nic(A, "ens10")
    lab.add_nic(B, "ens11")
    _start(lab)
    _wait(lab, lambda d: set(d) == {DEV_A, DEV_B}, "both NICs")
    lab.dra_kubelet.prepare(POD, [lab.claim("c1", [A])])
    lab.move_to_pod(A, "ens10")
    lab.move_to_pod(B, "ens11")
    devs = _wait(lab, lambda d: d[DEV_B][1], "the no-netdev taint")
    assert devs[DEV_B][1] == (f"{DRIVER}/no-netdev",)
    assert devs[DEV_A][1] == ()
    # The NIC in the pod keeps its attributes (it is the same NIC).
    assert devs[DEV_A][0]["ifName"] == "ens10"


def test_kubelet_restart_wipes_the_slices_and_they_come_back(lab):
    lab.add_nic(A, "ens10")
    _start(lab)
    _wait(lab, lambda d: DEV_A in d, "the slice")
    lab.dra_kubelet.restart()
    assert lab.dra_kubelet.wipes[-1] == (None, 1)
    _wait(lab, lambda d: DEV_A in d, "the slice published again")


def test_daemon_restart_within_the_wiping_delay_keeps_the_slices(lab):
    lab.add_nic(A, "ens10")
    _start(lab)
    _wait(lab, lambda d: DEV_A in d, "the slice")
    (before,) = lab.api.list("resourceslices")
    assert lab.signal()[0] == 0
    lab.dra_kubelet.wait(lambda: not lab.dra_kubelet.plugins, 5, "deregistration")
    lab.start(*lab.dra_args())
    lab.dra_kubelet.wait_registered(DRIVER)
    (after,) = lab.api.list("resourceslices")
    # Registered again before the kubelet's 30 s: nothing was wiped, the slice is the same.
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert [w for w in lab.dra_kubelet.wipes if w[0] == DRIVER] == []


def test_network_status_file_becomes_claim_status(lab):
    lab.add_nic(A, "ens10")
    _start(lab)
    claim = lab.claim("c1", [A], pods=[(POD, "web")])
    lab.dra_kubelet.prepare(POD, [claim])
    uid = claim["metadata"]["uid"]
    # What ehost-device writes after a successful ADD.
    claims.write_status(
        str(lab.dra_state_dir),
        claims.DeviceStatus(
            claim_uid=uid,
            claim_namespace="default",
            claim_name="c1",
            driver=DRIVER,
            pool=NODE,
            device=DEV_A,
            pod_uid=POD,
            container_id="c0ffee",
            if_name="net1",
            interface_name="net1",
            ips=("198.51.100.2/24",),
            hardware_address="52:54:00:00:00:0a",
        ),
    )

    def status_devices():
        return (lab.api.get("resourceclaims", "c1", "default").get("status") or {}).get(
            "devices"
        ) or []

    lab.dra_kubelet.wait(lambda: status_devices(), 10, "the claim's device status")
    (entry,) = status_devices()
    assert (entry["driver"], entry["pool"], entry["device"]) == (DRIVER, NODE, DEV_A)
    assert entry["networkData"] == {
        "interfaceName": "net1",
        "ips": ["198.51.100.2/24"],
        "hardwareAddress": "52:54:00:00:00:0a",
    }
    # DEL removes the file: the entry goes.
    claims.remove_status(str(lab.dra_state_dir), uid, DEV_A)
    lab.dra_kubelet.wait(lambda: not status_devices(), 10, "the device status removed")
