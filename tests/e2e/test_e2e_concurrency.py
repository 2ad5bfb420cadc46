"""Pods come and go concurrently: 20 ADD/DEL pairs over 8 NICs in-process, 50 through the warm
executor, and pods racing for one NIC. No NIC is ever given to two pods, and nothing is lost or
leaked at the end."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import pytest
from executor import Executor
from nodelab import Attachment, Node, PodSandbox, parse_cni
from testkubelet import AllocationFailed

# More pods than NICs at once: admission waits for a free NIC. Through the executor, 16 calls
# at once (the executor serves each in a thread of its own).
MODES = [("in-process", 20, 10), ("executor", 50, 16)]


@pytest.mark.parametrize("mode,pairs,workers", MODES, ids=[m[0] for m in MODES])
def test_concurrent_add_del_pairs_over_eight_nics(
    node: Node, figures, tmp_path, mode: str, pairs: int, workers: int
):
    executor = None
    if mode == "executor":
        executor = Executor(tmp_path, node.node.name)
        node.plugin_env = executor.env()
    try:
        _churn(node, figures, pairs, workers)
    finally:
        if executor is not None:
            assert executor.stop() == 0, executor.log()
    if executor is not None:
        calls = executor.calls()
        assert calls.count("ADD") == pairs and calls.count("DEL") == pairs, calls


def _churn(node: Node, figures, pairs: int, workers: int) -> None:
    holders: Dict[str, str] = {}
    guard = threading.Lock()
    violations: List[str] = []
    seen: List[str] = []

    def lifecycle(i: int) -> None:
        pod = node.new_pod(f"churn-{i}")
        deadline = time.monotonic() + 60
        while True:
            try:
                [dev] = node.admit(pod)
                break
            except AllocationFailed:
                assert time.monotonic() < deadline, f"{pod.name} never admitted"
                time.sleep(0.05)
        with guard:
            if dev in holders:
                violations.append(f"{dev} admitted to {pod.name} while {holders[dev]} holds it")
            holders[dev] = pod.name
            seen.append(dev)
        result = node.attach(pod).ok()
        link = node._link(pod.netns, "net1")
        if (
            link["address"] != node.nics[dev].mac
            or result["interfaces"][0]["mac"] != link["address"]
        ):
            violations.append(f"{pod.name} got {link['address']}, not {dev}'s NIC")
        node.detach(pod).ok()
        with guard:
            del holders[dev]
        node.release(pod)
        pod.netns.close()
        pod.netns_alive = False
        node.pods.pop(pod.name)

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(lifecycle, i) for i in range(pairs)]:
            f.result()
    assert not violations, violations
    assert len(seen) == pairs and len(set(seen)) == len(node.nics), seen  # all 8 NICs used
    node.account()
    assert node.leases() == {}
    node.wait_advertised()
    figures.add(scenarios_passed=1, faults_survived=pairs)


def test_pods_racing_for_the_same_nic_exactly_one_wins(node: Node, figures):
    """A stale or duplicated device ID (the kubelet would never hand one out twice, but a
    Multus reading an old checkpoint might): two pods ADD the same NIC at once, for all 8 NICs
    at the same time. One wins each, the other fails cleanly and its DEL disturbs nothing."""
    pairs: Dict[str, List[PodSandbox]] = {
        pci: [node.new_pod(), node.new_pod()] for pci in node.nics
    }
    procs = []
    for pci, pods in pairs.items():
        for pod in pods:
            conf = node.delegate(deviceID=pci, pciBusID=pci)
            cid = f"race{pod.uid}"
            procs.append(
                (
                    pci,
                    pod,
                    cid,
                    conf,
                    node.cni(
                        "ADD",
                        conf,
                        container_id=cid,
                        netns_path=pod.netns.path,
                        pod=pod,
                        background=True,
                    ),
                )
            )
    winners: Dict[str, List[str]] = {pci: [] for pci in node.nics}
    losers = []
    for pci, pod, cid, conf, proc in procs:
        out, err = proc.communicate(timeout=60)
        run = parse_cni(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        att = Attachment(cid, "net1", pci, conf)
        pod.attachments["net1"] = att
        if run.rc == 0:
            att.result = run.out
            winners[pci].append(pod.name)
        else:
            assert run.out is not None and run.out["code"] in (102, 11), run
            assert pci in run.out["msg"], run.out
            losers.append(pod)
    assert all(len(w) == 1 for w in winners.values()), winners
    node.sync_sysfs()
    node.account()
    for pod in losers:  # the runtime DELs the failed ADD: the winner keeps its NIC
        node.detach(pod).ok()
    node.account()
    for pods in pairs.values():
        for pod in pods:
            if "net1" in pod.attachments:
                node.detach(pod).ok()
            pod.netns.close()
            pod.netns_alive = False
            node.pods.pop(pod.name)
    node.account()
    assert node.leases() == {}
    figures.add(scenarios_passed=1, faults_survived=len(losers))
