"""A failing ADD undoes every step already done: IPAM DEL, name, MTU, MAC, namespace, state.

Failures are real: the kernel refusing a MAC or a route, host-local's own lease, and IPAM
plugins that fail or answer nonsense (tiny executables in a CNI_PATH of the test's own: the
IPAM contract is the interface under test, not a fake NIC).
"""

from __future__ import annotations

import os
import stat

import pytest
from conftest import CNI_BIN, VERSIONS

PCI = "0000:00:05.0"


def _ipam_script(rig, name: str, add_body: str) -> str:
    """An IPAM plugin that logs each command, runs `add_body` on ADD, and succeeds otherwise."""
    bindir = rig.tmp / "cnibin"
    bindir.mkdir(exist_ok=True)
    log = rig.tmp / f"{name}.calls"
    path = bindir / name
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$CNI_COMMAND $CNI_CONTAINERID" >> {log}\n'
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        f"{add_body}\n"
        "fi\n"
        "exit 0\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f"{bindir}:{CNI_BIN}"


def _calls(rig, name: str):
    log = rig.tmp / f"{name}.calls"
    return log.read_text().split("\n")[:-1] if log.exists() else []


@pytest.fixture
def nic(rig):
    rig.nic(PCI, "ens5")
    return rig.state("ens5")


def _restored(rig, pod, before):
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", pod)
    assert rig.leases() == []


@pytest.mark.parametrize("version", VERSIONS)
def test_ipam_add_fails(rig, nic, version):
    path = _ipam_script(
        rig,
        "failing-ipam",
        """echo '{"cniVersion": "1.0.0", "code": 11, "msg": "pool exhausted", "details": "x"}'
exit 1""",
    )
    pod = rig.pod()
    conf = rig.conf(version, deviceID=PCI, mtu=1400, ipam={"type": "failing-ipam"})
    err = rig.cni("ADD", conf, pod=pod, cni_path=path).error(11)
    assert "pool exhausted" in err["msg"]
    assert _calls(rig, "failing-ipam") == ["ADD ctr1", "DEL ctr1"]
    _restored(rig, pod, nic)


@pytest.mark.parametrize(
    "answer,word",
    [
        ('{"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]}', "ips[0].address"),
        ('{"cniVersion": "1.0.0", "ips": [{"address": "198.51.100.9"}]}', "prefix"),
        ('{"cniVersion": "1.0.0", "routes": [{"dst": "x"}]}', "routes[0].dst"),
        ("this is not json", "no JSON"),
    ],
)
def test_ipam_returns_an_unusable_result(rig, nic, answer, word):
    path = _ipam_script(rig, "odd-ipam", f"echo '{answer}'")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, ipam={"type": "odd-ipam"})
    err = rig.cni("ADD", conf, pod=pod, cni_path=path).error(106)
    assert word in err["msg"] + err["details"]
    assert _calls(rig, "odd-ipam") == ["ADD ctr1", "DEL ctr1"]
    _restored(rig, pod, nic)


def test_kernel_refuses_the_mac(rig, nic):
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, mtu=1400, mac="01:00:5e:00:00:01")  # multicast
    err = rig.cni("ADD", conf, pod=pod).error(107)
    assert "MAC" in err["details"]
    _restored(rig, pod, nic)


def test_address_step_fails(rig, nic):
    pod = rig.pod()
    ipam = {
        "type": "static",
        "addresses": [{"address": "198.51.100.7/24"}, {"address": "198.51.100.7/24"}],
    }
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI, ipam=ipam), pod=pod).error(107)
    assert "198.51.100.7/24" in err["details"]
    _restored(rig, pod, nic)


def test_route_step_fails_and_the_lease_is_released(rig, nic):
    pod = rig.pod()
    ipam = rig.host_local(routes=[{"dst": "203.0.113.0/24", "gw": "192.0.2.1"}])  # unreachable
    conf = rig.conf("1.0.0", deviceID=PCI, mac="02:00:00:00:05:09", ipam=ipam)
    err = rig.cni("ADD", conf, pod=pod).error(107)
    assert "203.0.113.0/24" in err["details"]
    _restored(rig, pod, nic)
    # Nothing lost: the NIC can be had again at once.
    rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod).ok()
    rig.cni("DEL", rig.conf("1.0.0", deviceID=PCI), pod=pod).ok()
    _restored(rig, pod, nic)


def test_down_nic_stays_down_after_rollback(rig):
    rig.nic(PCI, "ens5", up=False)
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, mac="01:00:5e:00:00:01")
    rig.cni("ADD", conf, pod=pod).error(107)
    _restored(rig, pod, before)
    assert not os.path.exists(rig.tmp / "failing-ipam.calls")
