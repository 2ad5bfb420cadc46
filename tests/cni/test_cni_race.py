"""Two ADDs racing for one NIC: exactly one wins, the other fails cleanly and disturbs nothing."""

from __future__ import annotations

import fcntl
import json
import os

from conftest import finish
from fakesysfs import FakeSysfs

PCI = "0000:00:05.0"


def test_two_adds_race_for_one_nic(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    for round_ in range(3):
        pods = [rig.pod(), rig.pod()]
        conf = rig.conf("1.1.0", deviceID=PCI)
        procs = [
            rig.cni("ADD", conf, pod=p, container_id=f"r{round_}-{i}", background=True)
            for i, p in enumerate(pods)
        ]
        runs = []
        for p in procs:
            out, errout = p.communicate(timeout=60)
            runs.append(finish(p.returncode, out, errout))
        winners = [i for i, r in enumerate(runs) if r.rc == 0]
        assert len(winners) == 1, [r.stdout for r in runs]
        w, loser = winners[0], 1 - winners[0]
        err = runs[loser].error(102)
        assert PCI in err["msg"]
        assert rig.has_link("net1", pods[w]) and not rig.has_link("net1", pods[loser])
        assert len(rig.leases()) == 1
        # The runtime DELs the failed attachment; the winner keeps its NIC.
        rig.cni("DEL", conf, pod=pods[loser], container_id=f"r{round_}-{loser}").ok()
        assert rig.has_link("net1", pods[w])
        rig.cni("DEL", conf, pod=pods[w], container_id=f"r{round_}-{w}").ok()
        assert rig.state("ens5") == before and rig.leases() == []


def test_lock_is_per_device_and_per_sysfs_tree(rig, tmp_path):
    from ehost_device import locks

    rig.nic(PCI, "ens5")
    # A second fake tree reusing the same PCI address for another NIC (another test process).
    other = FakeSysfs(tmp_path / "other-sys")
    rig.nic("0000:00:06.0", "ens6")
    other.add_virtio_nic(PCI, "ens6", mac=rig.state("ens6")["mac"])
    path_a = locks.lock_path(str(rig.fake.root), PCI)
    assert path_a != locks.lock_path(str(other.root), PCI)

    os.makedirs(os.path.dirname(path_a), exist_ok=True)
    fd = os.open(path_a, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another call is busy with tree A's 0000:00:05.0
        pod = rig.pod()
        err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI, lockTimeout=0.3), pod=pod).error(11)
        assert PCI in err["msg"]
        assert rig.has_link("ens5") and not rig.has_link("net1", pod)
        # Tree B's NIC with the same address is not held up by tree A's lock.
        conf_b = rig.conf("1.0.0", deviceID=PCI)
        policy_b = tmp_path / "policy-b.yaml"
        policy_b.write_text(f"sysfsRoot: {json.dumps(str(other.root))}\n")
        env_b = {"EHOST_DEVICE_POLICY": str(policy_b)}
        rig.cni("ADD", conf_b, pod=pod, env=env_b).ok()
        assert rig.has_link("net1", pod) and not rig.has_link("ens6")
        rig.cni("DEL", conf_b, pod=pod, env=env_b).ok()
        assert rig.has_link("ens6")
    finally:
        os.close(fd)
        os.unlink(path_a)
