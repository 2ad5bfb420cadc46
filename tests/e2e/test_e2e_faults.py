"""Faults on a running node; after each, nothing is lost: every NIC in a pod under the right name
or in the node under its own, no IPAM lease without an attachment, device-info files consistent,
the plugin registered and advertising the right health (Node.account, Node.wait_advertised)."""

from __future__ import annotations

import os
import signal
import time
from typing import List

from nodelab import CNI_BIN, RES, Node, PodSandbox

from virtcore import devinfo


def _plumbed(node: Node, n: int) -> List[PodSandbox]:
    pods = []
    for _ in range(n):
        pod = node.new_pod()
        node.admit(pod)
        node.attach(pod).ok()
        pods.append(pod)
    node.account()
    return pods


def _net1_address(pod: PodSandbox) -> str:
    att = pod.attachments["net1"]
    assert att.result is not None
    return att.result["ips"][0]["address"]


def _teardown(node: Node, pods: List[PodSandbox]) -> None:
    for pod in pods:
        node.remove_pod(pod)
    node.account()
    assert node.leases() == {}
    node.wait_advertised()


def test_kubelet_restarts_ten_times_with_pods_holding_nics(node: Node, figures):
    pods = _plumbed(node, 2)
    held = {p.devices[0]: p.owner for p in pods}
    registrations = len(node.kubelet.registrations)
    for _ in range(10):
        node.restart_kubelet()  # waits for Register, ListAndWatch and the right health
        assert node.kubelet.allocated[RES] == held  # restored from the checkpoint
        node.account()
        figures.add(faults_survived=1)
    assert len(node.kubelet.registrations) >= registrations + 10
    assert node.kubelet.restarts == 10
    # The node still works: the pods talk, and a new pod gets a NIC nobody holds.
    proc = node.ping(pods[0], _net1_address(pods[1]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    third = node.new_pod()
    [dev] = node.admit(third)
    assert dev not in held
    node.attach(third).ok()
    node.account()
    _teardown(node, pods + [third])
    figures.add(scenarios_passed=1)


def test_serve_sigkill_restart_then_sigterm_cleanup(node: Node, figures):
    pods = _plumbed(node, 2)
    socket = node.dp_dir / "kernel.org_virt.sock"
    node.stop_serve(signal.SIGKILL)
    # The kubelet sees the plugin go: its devices turn unhealthy; the NICs in pods stay put.
    node.kubelet.wait(
        lambda: set(node.kubelet.health(RES).values()) == {"Unhealthy"}, 10, "all Unhealthy"
    )
    assert socket.exists()  # a killed daemon cannot clean up
    node.account()

    before = len(node.kubelet.registrations)
    node.start_serve()
    node.kubelet.wait(lambda: len(node.kubelet.registrations) > before, 20, "re-registration")
    node.wait_advertised()
    node.account()  # includes: the pods' device-info files are still there
    figures.add(faults_survived=1)

    # The restarted daemon serves allocations and ehost-device keeps working with it.
    third = node.new_pod()
    [dev] = node.admit(third)
    assert dev not in {p.devices[0] for p in pods}
    node.attach(third).ok()
    node.account()

    # SIGTERM: exit 0, socket and its own device-info files removed, NICs in pods untouched.
    assert node.stop_serve(signal.SIGTERM) == 0
    assert not socket.exists()
    assert devinfo.load(str(node.devinfo_dir), RES, dev) is None
    node.kubelet.wait(
        lambda: set(node.kubelet.health(RES).values()) == {"Unhealthy"}, 10, "all Unhealthy"
    )
    node.account()
    figures.add(faults_survived=1)

    node.start_serve()
    node.wait_advertised()
    _teardown(node, pods + [third])
    figures.add(scenarios_passed=1)


def test_pod_namespace_deleted_before_del_and_del_twice(node: Node, figures):
    a, b, c = _plumbed(node, 3)
    # a's NIC comes back as net1, b's as dev<ifindex> (net1 is taken by then).
    back_a = node.kill_pod_namespace(a)
    back_b = node.kill_pod_namespace(b)
    assert list(back_a.values()) == ["net1"]
    assert list(back_b.values())[0].startswith("dev")
    assert len(node.leases()) == 3  # nobody has DELeted yet
    for pod in (a, b):
        node.detach(pod, forget=False).ok()
    node.account()
    figures.add(faults_survived=2)

    # DEL twice: the second finds nothing and succeeds without touching anything.
    for pod in (a, b):
        node.detach(pod).ok()
    node.detach(c, forget=False).ok()
    node.detach(c).ok()
    node.account()
    figures.add(faults_survived=3)
    for pod in (a, b, c):
        node.release(pod)
        node.pods.pop(pod.name)
    assert node.leases() == {}
    node.wait_advertised()
    figures.add(scenarios_passed=1)


def test_ipam_failure_during_add_then_add_retried(node: Node, figures):
    one_address = {
        "type": "host-local",
        "dataDir": str(node.ipam_dir),
        "ranges": [
            [
                {
                    "subnet": "198.51.100.0/24",
                    "rangeStart": "198.51.100.50",
                    "rangeEnd": "198.51.100.50",
                }
            ]
        ],
    }
    a, b = node.new_pod(), node.new_pod()
    node.admit(a)
    node.admit(b)
    node.attach(a, ipam=one_address).ok()
    # An IPAM plugin that is not there at all: the ADD fails with ehost-device's own code and
    # the NIC stays in the node; the runtime's DEL of it succeeds (the plugin is a resource
    # already gone, per the spec's DEL rule: a warning) and moves nothing.
    run = node.attach(b, ipam=dict(one_address, type="no-such-ipam"))
    assert run.rc != 0 and run.out is not None and run.out["code"] == 105, run.out
    assert "no-such-ipam" in run.out["msg"]
    node.account()
    run = node.detach(b)
    assert run.rc == 0 and run.out is None, run
    assert "no-such-ipam" in run.stderr and "IPAM DEL is skipped" in run.stderr, run.stderr
    node.account()
    figures.add(faults_survived=1)

    # The range is exhausted: host-local fails the ADD; b's NIC must be back where it was.
    run = node.attach(b, ipam=one_address)
    assert run.rc != 0 and run.out is not None, run
    assert "host-local" in run.out["msg"], run.out
    node.account()
    assert set(node.leases()) == {"198.51.100.50"}
    figures.add(faults_survived=1)

    # The runtime DELs the failed attachment, then retries the ADD once the range has room.
    node.detach(b).ok()
    node.detach(a).ok()
    retry = node.attach(b, ipam=one_address).ok()
    assert retry["ips"][0]["address"] == "198.51.100.50/24"
    node.account()
    _teardown(node, [a, b])
    figures.add(scenarios_passed=1)


def test_ehost_device_killed_in_the_middle_of_add_then_del(node: Node, figures, tmp_path):
    # A slow IPAM: the real host-local, reached after a marker and a long pause, so the test can
    # kill ehost-device at a known point: NIC already in the pod, IPAM not answered yet.
    node.cni_bin.mkdir()
    marker = tmp_path / "ipam-started"
    slow = node.cni_bin / "slow-host-local"
    slow.write_text(
        "#!/bin/sh\n"
        f'if [ "$CNI_COMMAND" = ADD ]; then : > {marker}; sleep 60; fi\n'
        f"exec {CNI_BIN}/host-local\n"
    )
    slow.chmod(0o755)
    pod = node.new_pod()
    [dev] = node.admit(pod)
    conf = node.delegate(deviceID=dev, pciBusID=dev)
    conf["ipam"]["type"] = "slow-host-local"
    cni_path = f"{node.cni_bin}:{CNI_BIN}"
    proc = node.cni(
        "ADD",
        conf,
        container_id="ctr-killed",
        netns_path=pod.netns.path,
        pod=pod,
        cni_path=cni_path,
        background=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "ehost-device never reached IPAM"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runtime's timeout: the plugin dies
        proc.communicate()
    # Half done: the NIC is in the pod, marked, with no address.
    link = node._link(pod.netns, "net1")
    assert link["address"] == node.nics[dev].mac
    assert link["ifalias"].startswith("virtdp/v1 ")
    assert node.netns_addresses(pod.netns, "net1") == []

    run = node.cni(
        "DEL",
        conf,
        container_id="ctr-killed",
        netns_path=pod.netns.path,
        pod=pod,
        cni_path=cni_path,
    )
    run.ok()
    node.sync_sysfs()
    node.account()
    assert node.leases() == {}
    figures.add(faults_survived=1)

    # The NIC is usable again at once (its lock was not left held).
    node.attach(pod).ok()
    node.account()
    _teardown(node, [pod])
    figures.add(scenarios_passed=1)


def test_carrier_loss_on_an_allocated_and_on_a_spare_nic(node: Node, figures):
    [a] = _plumbed(node, 1)
    held = a.devices[0]
    spare = next(p for p in sorted(node.nics) if p != held)

    node.cable(spare, False)
    node.wait_advertised()  # spare Unhealthy, the rest Healthy
    assert node.kubelet.health(RES)[spare] == "Unhealthy"
    figures.add(faults_survived=1)

    node.cable(held, False)
    # Inside the pod net1 loses its carrier; the node cannot see it and keeps its health.
    node.wait_kernel(
        lambda: "NO-CARRIER" in node._link(a.netns, "net1")["flags"], 5, "net1 NO-CARRIER"
    )
    node.wait_advertised()
    node.account()

    # The kubelet does not give the unhealthy spare to a new pod.
    b = node.new_pod()
    [dev_b] = node.admit(b)
    assert dev_b not in (spare, held)

    # Back in the node with the cable still pulled: advertised Unhealthy.
    node.detach(a).ok()
    node.release(a)
    node.wait_advertised()
    assert node.kubelet.health(RES)[held] == "Unhealthy"
    node.account()
    figures.add(faults_survived=1)

    node.cable(spare, True)
    node.cable(held, True)
    node.wait_advertised()
    assert set(node.kubelet.health(RES).values()) == {"Healthy"}
    node.release(b)
    node.pods.pop(a.name)
    node.pods.pop(b.name)
    node.account()
    figures.add(scenarios_passed=1)
