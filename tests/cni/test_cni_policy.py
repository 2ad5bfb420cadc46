"""The node policy: node-side settings come from a file on the node, an unusable policy stops
ADD before anything changes but never a DEL, and the policy's guard keeps the node's own NICs
and NICs outside the allowed pools on the host. (Hostile configs, one per file, are in
tests/corpus/cni/node-*.json and policy-*.json.)"""

from __future__ import annotations

import os

import pytest
from netlab import ip

PCI = "0000:00:05.0"
OTHER = "0000:00:06.0"


@pytest.fixture
def plumbed(rig):
    """ens5 (PCI) plumbed into a pod as net1 with a host-local lease."""
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    rig.cni("ADD", conf, pod=pod).ok()
    assert rig.has_link("net1", pod) and len(rig.leases()) == 1
    return rig, pod, conf, before


@pytest.mark.parametrize(
    "breakage",
    ["malformed", "missing", "unreadable", "not-utf8"],
)
def test_unusable_policy_stops_add_but_never_del(plumbed, breakage):
    rig, pod, conf, before = plumbed
    env = {}
    if breakage == "malformed":
        rig.policy.write_text("sysfsRoot: [/sys\n")
    elif breakage == "missing":
        env = {"EHOST_DEVICE_POLICY": str(rig.tmp / "absent.yaml")}
    elif breakage == "unreadable":
        env = {"EHOST_DEVICE_POLICY": str(rig.tmp)}  # a directory
    else:
        rig.policy.write_bytes(b"logLevel: \xff\n")
    # A second NIC stays put: ADD fails before it looks at anything.
    rig.nic(OTHER, "ens6")
    other = rig.state("ens6")
    pod2 = rig.pod()
    err = rig.cni(
        "ADD", rig.conf("1.0.0", deviceID=OTHER), pod=pod2, container_id="c2", env=env
    ).error(109)
    assert (
        str(rig.policy) in err["details"]
        or "absent.yaml" in err["details"]
        or str(rig.tmp) in err["details"]
    ), err
    assert rig.state("ens6") == other and not rig.has_link("net1", pod2)
    # DEL still gives the first NIC back and releases its lease.
    run = rig.cni("DEL", conf, pod=pod, env=env)
    run.ok()
    assert "node policy unusable" in run.stderr
    assert rig.state("ens5") == before and rig.leases() == []


def test_del_with_todays_config_still_carrying_node_keys(plumbed):
    # A NAD written before the node policy existed: DEL ignores the keys, and says so.
    rig, pod, conf, before = plumbed
    old = dict(conf, sysfsRoot="/sys", logFile=str(rig.tmp / "tenant.log"))
    run = rig.cni("DEL", old, pod=pod)
    run.ok()
    assert "ignored" in run.stderr and "sysfsRoot" in run.stderr
    assert rig.state("ens5") == before and rig.leases() == []
    assert not (rig.tmp / "tenant.log").exists()


def test_log_file_from_the_policy_never_through_a_symlink(rig):
    rig.nic(PCI, "ens5")
    target = rig.tmp / "target"
    target.write_text("")
    link = rig.tmp / "ehost.log"
    link.symlink_to(target)
    rig.write_policy(logFile=str(link))
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    run = rig.cni("ADD", conf, pod=pod)
    run.ok()
    assert target.read_text() == "" and "cannot open logFile" in run.stderr
    real = rig.tmp / "real.log"
    rig.write_policy(logFile=str(real))
    rig.cni("DEL", conf, pod=pod).ok()
    assert "is back on the host as ens5" in real.read_text()
    assert oct(os.stat(real).st_mode & 0o777) == "0o600"


def test_log_file_must_be_a_regular_file(rig):
    rig.nic(PCI, "ens5")
    fifo = rig.tmp / "fifo"
    os.mkfifo(fifo)
    rig.write_policy(logFile=str(fifo))
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    run = rig.cni("ADD", conf, pod=pod)
    run.ok()  # logging falls back to stderr; the call itself is fine
    assert "cannot open logFile" in run.stderr
    rig.cni("DEL", conf, pod=pod).ok()


def test_allowed_pools_let_in_only_their_nics(rig):
    rig.nic(PCI, "ens5")
    rig.nic(OTHER, "ens6")
    pools = rig.tmp / "pools.yaml"
    pools.write_text(
        "pools:\n"
        "  - resourceName: example.com/fast\n"
        "    selectors:\n"
        f"      pciAddresses: ['{OTHER}']\n"
        "  - resourceName: kernel.org/virt\n"
        "    selectors: {drivers: [virtio_net]}\n"
    )
    rig.write_policy(allowedPools=["example.com/fast"], poolConfig=str(pools))
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod).error(110)
    assert "pool kernel.org/virt" in err["msg"] and "example.com/fast" in err["msg"]
    assert rig.has_link("ens5") and not rig.has_link("net1", pod)
    conf = rig.conf("1.0.0", deviceID=OTHER)
    rig.cni("ADD", conf, pod=pod).ok()
    assert rig.has_link("net1", pod)
    rig.cni("DEL", conf, pod=pod).ok()
    # A pool the pool config does not have is the policy's error (109), not the NIC's.
    rig.write_policy(allowedPools=["example.com/gone"], poolConfig=str(pools))
    err = rig.cni("ADD", conf, pod=pod).error(109)
    assert "allowedPools[0]" in err["details"]
    assert rig.has_link("ens6")


def test_a_nic_the_node_routes_through_stays(rig):
    rig.nic(PCI, "ens5")
    ip("addr", "add", "198.18.0.2/24", "dev", "ens5", ns=rig.node.name)
    before = rig.state("ens5")
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod).error(110)
    assert "198.18.0.2/24" in err["msg"]
    assert rig.state("ens5") == before and not rig.has_link("net1", pod)
    assert rig.leases() == []
    # The address gone (only a link-local one left), the NIC may go.
    ip("addr", "flush", "dev", "ens5", "scope", "global", ns=rig.node.name)
    conf = rig.conf("1.0.0", deviceID=PCI)
    rig.cni("ADD", conf, pod=pod).ok()
    rig.cni("DEL", conf, pod=pod).ok()
