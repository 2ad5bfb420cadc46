"""The seed scenario: two pods each get a virtio NIC and reach each other over it."""

from __future__ import annotations

import subprocess

import pytest
from conftest import VERSIONS


@pytest.mark.parametrize("version", ["0.3.1", "1.1.0"])
def test_two_pods_ping_each_other_then_get_their_nics_back(rig, version):
    assert version in VERSIONS
    rig.nic_pair("0000:00:05.0", "ens5", "0000:00:06.0", "ens6")
    before = {n: rig.state(n) for n in ("ens5", "ens6")}
    pod_a, pod_b = rig.pod(), rig.pod()
    conf_a = rig.conf(version, deviceID="0000:00:05.0")
    conf_b = rig.conf(version, deviceID="0000:00:06.0")

    out_a = rig.cni("ADD", conf_a, pod=pod_a, container_id="pod-a").ok()
    out_b = rig.cni("ADD", conf_b, pod=pod_b, container_id="pod-b").ok()
    addr_a = out_a["ips"][0]["address"].split("/")[0]
    addr_b = out_b["ips"][0]["address"].split("/")[0]
    assert addr_a != addr_b
    assert sorted(rig.leases()) == sorted([addr_a, addr_b])

    for src, dst in ((pod_a, addr_b), (pod_b, addr_a)):
        ping = subprocess.run(
            ["ip", "netns", "exec", src.name, "ping", "-c", "2", "-W", "2", dst],
            capture_output=True,
            text=True,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr

    rig.cni("DEL", dict(conf_a, prevResult=out_a), pod=pod_a, container_id="pod-a").ok()
    rig.cni("DEL", dict(conf_b, prevResult=out_b), pod=pod_b, container_id="pod-b").ok()
    assert {n: rig.state(n) for n in ("ens5", "ens6")} == before
    assert rig.leases() == []
    assert not rig.has_link("net1", pod_a) and not rig.has_link("net1", pod_b)
