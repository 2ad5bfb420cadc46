"""Pods made by containerd's CRI, their network ehost-device: what a node's runtime does to the
plugin (its own netns handling, DEL twice per pod, the conflist as it is at DEL time, cleanup
after a failed ADD, a runtime that dies with pods running)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import containerd
import cri_api_pb2 as api
import grpc
import pytest

PCI_A, PCI_B, PCI_C, PCI_D = "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0", "0000:00:0d.0"


@pytest.fixture
def pair(lab):
    return lab.nic_pair(PCI_A, "ens10", PCI_B, "ens11")


def _dels(lab, pod_id: str) -> List[str]:
    """What ehost-device logged for each successful DEL of a sandbox (containerd's libcni
    passes a plugin's stderr to its own when the call succeeds)."""
    return re.findall(rf"INFO (DEL {pod_id}: .*)", lab.ctd.log_tail(10**7))


def _gone(lab, *pods) -> None:
    ids = {p.id for p in lab.cri.pods()}
    for pod in pods:
        assert pod.id not in ids


def _stop_remove(lab, pod, errors: List[BaseException]) -> None:
    try:
        lab.stop_pod(pod)
        lab.remove_pod(pod)
    except BaseException as e:  # reported by the test thread
        errors.append(e)


def test_pods_get_their_nics_and_reach_each_other_over_them(lab, pair):
    a, b = pair
    p1 = lab.run_pod(a)
    p2 = lab.run_pod(b)
    assert lab.in_pod(p1, a) and lab.in_pod(p2, b)
    assert not lab.has_link(a.name) and not lab.has_link(b.name)
    assert p1.ip and p2.ip and p1.ip != p2.ip
    assert f"{p1.ip}/24" in lab.addresses(p1) and f"{p2.ip}/24" in lab.addresses(p2)
    assert lab.leases() == sorted([p1.ip, p2.ip])

    # From inside a container of the first pod: its eth0, then the other pod over the wire.
    box = lab.container(p1)
    seen = lab.cri.exec(box, ["ip", "-o", "addr", "show", "dev", "eth0"])
    assert seen.exit_code == 0 and f"{p1.ip}/24" in seen.stdout.decode(), seen
    ping = lab.cri.exec(box, ["ping", "-c", "1", "-W", "5", p2.ip])
    assert ping.exit_code == 0, (ping.stdout, ping.stderr)

    for pod in (p1, p2):
        lab.stop_pod(pod)
        lab.remove_pod(pod)
    assert lab.home(a) and lab.home(b)
    assert lab.leases() == [] and lab.cni_cache() == []


def test_stop_gives_the_nic_back_and_remove_changes_nothing(lab, pair):
    a, _ = pair
    pod = lab.run_pod(a)
    assert lab.in_pod(pod, a)
    # libcni's cached results (StopPodSandbox's prevResult): our network's and the loopback's.
    assert [n.split("-")[0] for n in lab.cni_cache()] == ["cni", "vcri"], lab.cni_cache()

    lab.stop_pod(pod)  # DEL with CNI_NETNS and the cached prevResult
    assert lab.home(a)
    assert lab.leases() == []
    assert not os.path.exists(pod.netns)  # containerd removed the namespace after the DEL
    after_stop = lab.nic_state(a)

    lab.remove_pod(pod)  # DEL again: CNI_NETNS empty, no prevResult
    assert lab.nic_state(a) == after_stop and lab.home(a)
    assert lab.leases() == [] and lab.cni_cache() == []
    _gone(lab, pod)
    dels = _dels(lab, pod.id)
    assert len(dels) == 2, dels
    assert f"{a.pci} is back on the host as {a.name}" in dels[0]
    assert "no NIC to give back" in dels[1]


def test_conflist_changed_between_add_and_del_takes_only_this_pods_nic(lab, pair):
    a, b = pair
    p1 = lab.run_pod(a)
    p2 = lab.run_pod(b)  # the node's conflist now names the second pod's NIC
    assert lab.loaded_plugin()["deviceID"] == b.pci

    lab.stop_pod(p1)
    assert lab.home(a)
    assert lab.in_pod(p2, b) and not lab.has_link(b.name)
    lab.remove_pod(p1)
    assert lab.in_pod(p2, b)
    assert lab.leases() == [p2.ip]

    lab.stop_pod(p2)
    lab.remove_pod(p2)
    assert lab.home(a) and lab.home(b)
    assert lab.leases() == [] and lab.cni_cache() == []


def test_failed_add_leaves_the_nic_home_and_no_sandbox(lab, pair):
    a, _ = pair
    (lab.bin / "host-local").unlink()  # the IPAM plugin is missing on this node
    with pytest.raises(grpc.RpcError) as failed:
        lab.run_pod(a)
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    details = failed.value.details()
    assert "IPAM plugin 'host-local' not found" in details, details
    # containerd ran DEL for the failed sandbox, and it succeeded (containerd's libcni passes a
    # plugin's stderr on only when the call succeeds: a failed DEL leaves no line here).
    sandbox = re.search(r'sandbox \\?"([0-9a-f]{64})', details)
    assert sandbox, details
    assert any("no NIC to give back" in d for d in _dels(lab, sandbox.group(1)))
    assert lab.home(a)
    assert lab.cri.pods() == []
    assert lab.pod_netns_files() == [] and lab.cni_cache() == []
    assert lab.leases() == []

    (lab.bin / "host-local").symlink_to(os.path.join("/usr/lib/cni", "host-local"))
    pod = lab.run_pod(a)  # the node works again once the plugin is back
    assert lab.in_pod(pod, a)
    lab.stop_pod(pod)
    lab.remove_pod(pod)
    assert lab.home(a) and lab.leases() == []


def test_containerd_killed_with_pods_running_then_stop_and_remove(lab, pair):
    a, b = pair
    p1 = lab.run_pod(a)
    p2 = lab.run_pod(b)
    lab.ctd.kill(signal.SIGKILL)
    assert len(lab.ctd.shims()) == 2  # the pods outlive their runtime, as on a node
    assert lab.in_pod(p1, a) and lab.in_pod(p2, b)

    lab.ctd.start()
    listed = {p.id: p.state for p in lab.cri.pods()}
    assert listed == {p1.id: api.SANDBOX_READY, p2.id: api.SANDBOX_READY}
    for pod in (p1, p2):
        lab.stop_pod(pod)
        lab.remove_pod(pod)
    assert lab.home(a) and lab.home(b)
    assert lab.leases() == [] and lab.cni_cache() == []
    assert lab.ctd.shims() == []


def test_pause_process_killed_then_stop_and_remove(lab, pair):
    a, _ = pair
    pod = lab.run_pod(a)
    os.kill(lab.cri.pod_pid(pod.id), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while lab.cri.pod_status(pod.id).status.state != api.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "containerd did not notice the sandbox died"
        time.sleep(0.05)
    assert lab.in_pod(pod, a)  # the namespace outlives its process (containerd's mount)

    lab.stop_pod(pod)
    lab.remove_pod(pod)
    assert lab.home(a)
    assert lab.leases() == [] and lab.cni_cache() == []
    _gone(lab, pod)


def test_twelve_pods_churned_over_four_nics_four_at_a_time(lab):
    nics = list(lab.nic_pair(PCI_A, "ens10", PCI_B, "ens11"))
    nics += lab.nic_pair(PCI_C, "ens12", PCI_D, "ens13")
    for wave in range(3):
        # One RunPodSandbox per NIC (the conflist names it, as Multus's deviceID would) ...
        pods = [lab.run_pod(nic, f"churn-{wave}-{i}") for i, nic in enumerate(nics)]
        for pod, nic in zip(pods, nics):
            assert lab.in_pod(pod, nic), (pod.name, nic)
        assert lab.leases() == sorted(p.ip for p in pods)
        # ... then all four stopped and removed at once; every DEL but one carries a conflist
        # that names another pod's NIC.
        errors: List[BaseException] = []
        threads = [threading.Thread(target=_stop_remove, args=(lab, p, errors)) for p in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert errors == []
        assert all(lab.home(nic) for nic in nics), [n.name for n in nics if not lab.home(n)]
        assert lab.leases() == [] and lab.cni_cache() == []
    assert lab.cri.pods() == []
    assert lab.sandboxes_run == 12


def test_suite_skips_with_a_reason_without_containerd(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "containerd not found on PATH" in (containerd.missing() or "")


_DIES = """
import sys, time
from pathlib import Path
import crilab
lab = crilab.CriLab(Path(sys.argv[1]))
a, _ = lab.nic_pair("0000:00:0a.0", "ens10", "0000:00:0b.0", "ens11")
lab.start()
lab.run_pod(a)
print(lab.root, lab.ctd.socket, " ".join(ns.name for ns in lab.namespaces), flush=True)
time.sleep(600)
"""


def test_a_run_killed_mid_test_is_swept_by_the_next(tmp_path):
    # The test process itself SIGKILLed with a pod running (a cancelled CI job): no teardown
    # ran. The next lab's sweep removes its containerd, shim, pod, mounts and namespaces.
    why = containerd.missing()
    if why:
        pytest.skip(f"containerd suite: {why}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen(
        [sys.executable, "-c", _DIES, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        root, socket, namespaces = child.stdout.readline().split(" ", 2)
        assert os.path.exists(socket)
    finally:
        child.kill()
        child.wait()
    stale = containerd.Containerd.stale(Path(root), {})
    assert stale.shims()  # its pod outlived it
    shim_sockets = [stale.shim_socket(t) for t in stale.task_ids()]
    assert shim_sockets and all(os.path.exists(s) for s in shim_sockets)
    # libcni's cache entry of the sandbox's loopback (containerd's CRI plugin sets up `lo`
    # through libcni too): no DEL will ever remove it.
    loopback = [
        f"{containerd.LOOPBACK_NETWORK}-{t}-lo"
        for t in stale.task_ids()
        if os.path.exists(
            os.path.join(containerd.CNI_RESULTS, f"{containerd.LOOPBACK_NETWORK}-{t}-lo")
        )
    ]
    assert loopback, os.listdir(containerd.CNI_RESULTS)

    containerd.sweep_stale()
    assert not os.path.exists(root)
    assert stale.shims() == []
    assert not any(os.path.exists(s) for s in shim_sockets)
    assert not any(os.path.exists(os.path.join(containerd.CNI_RESULTS, n)) for n in loopback)
    assert not any(socket in _cmdline(p) for p in _pids("containerd"))
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in namespaces.split())
    with open("/proc/self/mountinfo") as f:
        assert root not in f.read()


def _pids(name: str) -> List[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/comm").read().strip() == name:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return ""
