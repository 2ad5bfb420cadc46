"""A caller that dies, and the runtime's DEL that follows at once (both modes).

What a real runtime does after a failed or timed-out ADD: containerd and the kubelet SIGKILL the
plugin process they exec'd (or it is OOM-killed) and send DEL for the same attachment at once,
retrying a DEL that fails. In-process the work dies with the process (its IPAM plugin too); in
executor mode the process that dies is the front, and the executor must give the same
guarantee: an ADD whose front is gone does not count (not started, rolled back, or undone), and
a DEL of the same attachment runs after it, never alongside.

- Front SIGKILL storm: kills at 24 points spread over the measured length of an ADD, and of a
  DEL; after each, with the runtime's DEL done: the NIC home under its name with its alias
  cleared, no lease, nothing in the pod, and the executor still serving.
- A DEL that arrives while the abandoned ADD is still running (its IPAM plugin paused).
- The runtime gave up (front timeout) on an ADD still running: it is undone.
- The executor SIGKILLed at 24 points of an ADD (and mid-IPAM) and restarted before the
  runtime's DEL.
- 50 concurrent ADD/DEL pairs over 8 NICs with random front kills: 0 lost, 0 leaked.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import CNI_BIN, Rig
from netlab import Netns

PCI = "0000:00:05.0"
POINTS = 24


def _kill(proc: Any) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


def _runtime_del(rig: Rig, conf: Dict[str, Any], pod: Netns, **kw: Any) -> None:
    """The runtime's DEL: once, and once more if it failed (as containerd retries)."""
    first = rig.cni("DEL", conf, pod=pod, **kw)
    if first.rc != 0:
        rig.cni("DEL", conf, pod=pod, **kw).ok()


def _settled(rig: Rig, pod: Netns, before: Dict[str, Any], name: str = "ens5") -> None:
    assert rig.has_link(name), f"{name} is not home"
    assert rig.state(name) == before, "the NIC came home changed (name, MAC, MTU, state, alias)"
    assert not rig.has_link("net1", pod), "the pod still holds the NIC"
    assert rig.leases() == [], "an IPAM lease leaked"


def _length(rig: Rig, conf: Dict[str, Any], pod: Netns, command: str) -> float:
    """Median wall time of `command` (ADD or DEL) as the runtime sees it, process start
    included, over three runs."""
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        rig.cni("ADD", conf, pod=pod).ok()
        t1 = time.monotonic()
        rig.cni("DEL", conf, pod=pod).ok()
        times.append(t1 - t0 if command == "ADD" else time.monotonic() - t1)
    return sorted(times)[1]


def _points(length: float) -> List[float]:
    """POINTS kill times spread evenly over the measured length."""
    return [length * i / POINTS for i in range(POINTS)]


@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_front_sigkill_storm_then_the_runtimes_del(rig: Rig, command: str, figures: Any):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    length = _length(rig, conf, pod, command)
    kills = 0
    for point in _points(length):
        if command == "DEL":
            rig.cni("ADD", conf, pod=pod).ok()
        proc = rig.cni(command, conf, pod=pod, background=True)
        time.sleep(point)
        if proc.poll() is None:
            kills += 1
        _kill(proc)
        _runtime_del(rig, conf, pod)
        _settled(rig, pod, before)
        figures.add(faults_survived=1)
    assert kills >= POINTS // 2, f"only {kills} of {POINTS} calls were still running when killed"
    # Still serving, and the NIC still usable.
    out = rig.cni("ADD", conf, pod=pod).ok()
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    _settled(rig, pod, before)
    if rig.executor is not None and command == "ADD":
        assert (
            "gave up" in rig.executor.log()
        ), "no ADD was abandoned: the storm missed the executor"


def _slow_ipam(rig: Rig, pause: float = 3.0, where: str = "after") -> str:
    """CNI_PATH with `slow-ipam`: host-local that pauses `pause` s on ADD, `before` or `after`
    it allocates; it notes its pid and when it is paused."""
    d = rig.tmp / "slowbin"
    d.mkdir(exist_ok=True)
    marks = rig.tmp / "marks"
    marks.mkdir(exist_ok=True)
    script = d / "slow-ipam"
    if where == "before":
        body = f"touch {marks}/paused\nsleep {pause}\nexec {CNI_BIN}/host-local\n"
    else:
        body = (
            f"out=$({CNI_BIN}/host-local)\nrc=$?\n"
            f'touch {marks}/paused\nsleep {pause}\necho "$out"\nexit $rc\n'
        )
    script.write_text(
        f'#!/bin/sh\nif [ "$CNI_COMMAND" != ADD ]; then exec {CNI_BIN}/host-local; fi\n'
        f"echo $$ > {marks}/pid\n" + body
    )
    script.chmod(0o755)
    return f"{d}:{CNI_BIN}"


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _ipam_done(rig: Rig) -> None:
    pid = int((rig.tmp / "marks" / "pid").read_text())
    _wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, f"IPAM pid {pid} to end")


@pytest.mark.parametrize("where", ["before", "after"])
def test_del_while_the_abandoned_add_still_runs(rig: Rig, where: str, figures: Any):
    """The NIC is in the pod and its IPAM ADD paused, `before` or `after` it allocates, when the
    front dies; the DEL comes at once, while the ADD (executor) or its orphaned IPAM plugin
    (in-process) would still run: the lease must not be taken after that DEL."""
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    cni_path = _slow_ipam(rig, where=where)
    conf = rig.conf("1.0.0", deviceID=PCI)
    conf["ipam"]["type"] = "slow-ipam"
    add = rig.cni("ADD", conf, pod=pod, cni_path=cni_path, background=True)
    _wait_for(lambda: (rig.tmp / "marks" / "paused").exists(), 30, "the IPAM plugin to pause")
    _kill(add)
    _runtime_del(rig, conf, pod, cni_path=cni_path)
    _ipam_done(rig)
    _settled(rig, pod, before)
    figures.add(faults_survived=1)
    if rig.executor is not None:
        log = rig.executor.log()
        assert "gave up on its ADD" in log, log
        # The DEL ran after the ADD was rolled back, not alongside it.
        assert log.index("gave up on its ADD") < log.rindex(" call DEL "), log


def test_runtime_gave_up_the_add_is_undone(erig_timeout: Rig, figures: Any):
    """The front's budget runs out (EHOST_DEVICE_TIMEOUT) while its ADD runs: it answers 11,
    and the executor does not leave the ADD behind, with or without the runtime's DEL."""
    rig = erig_timeout
    assert rig.executor is not None
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    cni_path = _slow_ipam(rig, pause=2.0)
    conf = rig.conf("1.0.0", deviceID=PCI)
    conf["ipam"]["type"] = "slow-ipam"
    err = rig.cni("ADD", conf, pod=pod, cni_path=cni_path, env={"EHOST_DEVICE_TIMEOUT": "1"}).error(
        11
    )
    assert "did not answer in time" in err["msg"], err
    # No DEL: the executor rolls the ADD back on its own once the IPAM plugin returns.
    _ipam_done(rig)
    _wait_for(lambda: "gave up on its ADD" in rig.executor.log(), 30, "the ADD to be undone")
    _wait_for(lambda: rig.has_link("ens5"), 30, "the NIC to come home")
    _settled(rig, pod, before)
    rig.cni("DEL", conf, pod=pod, cni_path=cni_path).ok()  # the runtime's DEL, later: a no-op
    _settled(rig, pod, before)
    figures.add(faults_survived=1)


@pytest.fixture
def erig_timeout(tmp_path: Path, fake_sysfs: Any) -> Any:
    r = Rig(tmp_path, fake_sysfs, "executor")
    try:
        yield r
    finally:
        r.close()


def test_executor_killed_mid_add_and_restarted_before_the_del(erig_timeout: Rig, figures: Any):
    rig = erig_timeout
    assert rig.executor is not None
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    cni_path = _slow_ipam(rig)
    conf = rig.conf("1.0.0", deviceID=PCI)
    conf["ipam"]["type"] = "slow-ipam"
    add = rig.cni("ADD", conf, pod=pod, cni_path=cni_path, background=True)
    _wait_for(lambda: (rig.tmp / "marks" / "paused").exists(), 30, "the IPAM plugin to pause")
    rig.executor.kill(signal.SIGKILL)
    out, _ = add.communicate(timeout=60)
    assert add.returncode != 0 and '"code": 11' in out, out
    rig.executor.start()  # a new executor, before the runtime's DEL
    _ipam_done(rig)  # the IPAM plugin died with the executor or ran to its end
    _runtime_del(rig, conf, pod, cni_path=cni_path)
    _settled(rig, pod, before)
    figures.add(faults_survived=1)


def test_fifty_pairs_over_eight_nics_with_random_front_kills(rig: Rig, figures: Any):
    nics = [(f"0000:00:{0x10 + i:02x}.0", f"ens{0x10 + i}") for i in range(8)]
    for pci, name in nics:
        rig.nic(pci, name)
    before = {name: rig.state(name) for _, name in nics}
    pods = [rig.pod() for _ in range(50)]
    rnd = random.Random(17)
    plan = [(k, nics[k % 8][0], rnd.random() < 0.4, rnd.uniform(0.0, 0.08)) for k in range(50)]

    def pair(step: Any) -> str:
        k, pci, kill, when = step
        conf = rig.conf("1.0.0", deviceID=pci, lockTimeout=60)
        cid = f"c{k}"
        proc = rig.cni("ADD", conf, pod=pods[k], container_id=cid, background=True)
        if kill:
            time.sleep(when)
            _kill(proc)
        else:
            proc.communicate(timeout=120)
        _runtime_del(rig, conf, pods[k], container_id=cid)
        return "killed" if kill else str(proc.returncode)

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(pair, plan))
    lost = [name for _, name in nics if not rig.has_link(name)]
    changed = [name for _, name in nics if name not in lost and rig.state(name) != before[name]]
    leaked = rig.leases()
    figures.add(nics_lost=len(lost) + len(changed), leases_leaked=len(leaked), faults_survived=50)
    assert not lost and not changed, f"lost {lost}, changed {changed}"
    assert leaked == [], leaked
    for p in pods:
        assert not rig.has_link("net1", p)
    assert outcomes.count("killed") >= 10, outcomes


def _orphans_gone(container_id: str) -> None:
    """Wait until no process of this attachment runs (an IPAM plugin orphaned by a killed
    executor runs to its end: a real runtime's DEL could come before or after it)."""
    needle = f"CNI_CONTAINERID={container_id}\0".encode()

    def alive() -> bool:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read():
                        return True
            except OSError:
                continue
        return False

    _wait_for(lambda: not alive(), 30, f"processes of {container_id} to end")


def test_executor_sigkill_storm_then_restart_and_the_runtimes_del(erig_timeout: Rig, figures: Any):
    """The executor SIGKILLed at 24 points of an ADD, restarted, then the runtime's DEL."""
    rig = erig_timeout
    assert rig.executor is not None
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    length = _length(rig, conf, pod, "ADD")
    for i, point in enumerate(_points(length)):
        cid = f"k{i}"
        proc = rig.cni("ADD", conf, pod=pod, container_id=cid, background=True)
        time.sleep(point)
        rig.executor.kill(signal.SIGKILL)
        proc.communicate(timeout=60)
        _orphans_gone(cid)
        rig.executor.start()
        _runtime_del(rig, conf, pod, container_id=cid)
        _settled(rig, pod, before)
        figures.add(faults_survived=1)
    rig.forwarded = 0  # the last executor served only DELs; the rig checks it served something
    out = rig.cni("ADD", conf, pod=pod).ok()
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    _settled(rig, pod, before)
