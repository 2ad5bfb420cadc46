"""Bad input: a CNI error JSON with the spec's code, a non-zero exit, and the NIC untouched."""

from __future__ import annotations

import json

import pytest
from conftest import VERSIONS

PCI = "0000:00:05.0"


@pytest.fixture
def setup(rig):
    rig.nic(PCI, "ens5")
    rig.fake.add_non_virtio_nic("0000:00:07.0", "eno7")
    pod = rig.pod()
    return rig, pod, rig.state("ens5")


def _untouched(rig, pod, before):
    assert rig.state("ens5") == before
    assert rig.has_link("ens5")
    assert not rig.has_link("net1", pod)
    assert rig.leases() == []


def test_malformed_json(setup):
    rig, pod, before = setup
    for data in ("{not json", "[1, 2]", ""):
        err = rig.cni("ADD", data, pod=pod).error(6)
        assert err["cniVersion"] == "1.1.0"
    _untouched(rig, pod, before)


@pytest.mark.parametrize("version", [None, "0.2.0", "2.0.0", 1])
def test_missing_or_unknown_cni_version(setup, version):
    rig, pod, before = setup
    conf = rig.conf("1.0.0", deviceID=PCI)
    conf["cniVersion"] = version
    if version is None:
        del conf["cniVersion"]
    err = rig.cni("ADD", conf, pod=pod).error(1)
    assert "1.1.0" in err["details"]
    _untouched(rig, pod, before)


@pytest.mark.parametrize(
    "var", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
)
def test_missing_cni_variables(setup, var):
    rig, pod, before = setup
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod, drop=(var,)).error(4)
    assert var in err["msg"] + err["details"]
    _untouched(rig, pod, before)


@pytest.mark.parametrize("ifname", ["a" * 16, "net/1", "net:1", "net 1", "net\t1", ".", ""])
def test_bad_ifname(setup, ifname):
    rig, pod, before = setup
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod, ifname=ifname).error(4)
    assert "CNI_IFNAME" in err["msg"] + err["details"]
    _untouched(rig, pod, before)


def test_bad_container_id_and_command(setup):
    rig, pod, before = setup
    rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod, container_id="-x").error(4)
    err = rig.cni("FROB", rig.conf("1.0.0", deviceID=PCI), pod=pod).error(4)
    assert "CNI_COMMAND" in err["msg"]
    _untouched(rig, pod, before)


@pytest.mark.parametrize(
    "key,value,code,word",
    [
        ("deviceID", "../../x", 7, "PCI address"),
        ("deviceID", 5, 7, "PCI address"),
        ("deviceID", "0000:00:09.0", 100, "no PCI device"),
        ("deviceID", "0000:00:07.0", 101, "not a virtio NIC"),
        ("device", "nosuch0", 100, "no host interface"),
        ("device", "bad/name", 7, "device"),
        ("hwaddr", "02:00:00:00:00:aa", 100, "MAC"),
        ("hwaddr", "zz", 7, "hwaddr"),
        ("mtu", 10, 7, "mtu"),
        ("mtu", "1500", 7, "mtu"),
        ("mac", "not-a-mac", 7, "mac"),
        ("sysfsRoot", "relative/sys", 7, "sysfsRoot"),
        ("sysfsRoot", "/sys", 7, "node setting"),
        ("logFile", "/tmp/x.log", 7, "node setting"),
        ("executorSocket", "/tmp/x.sock", 7, "node setting"),
        ("logLevel", "loud", 7, "logLevel"),
        ("pciBusID", "0000:00:06.0", 7, "conflicting"),
    ],
)
def test_bad_config_values(setup, key, value, code, word):
    rig, pod, before = setup
    conf = rig.conf("1.0.0", deviceID=PCI)
    if key in ("device", "hwaddr"):
        del conf["deviceID"]
    conf[key] = value
    err = rig.cni("ADD", conf, pod=pod).error(code)
    assert word.lower() in (err["msg"] + " " + err["details"]).lower(), err
    _untouched(rig, pod, before)


def test_no_nic_named_and_no_name(setup):
    rig, pod, before = setup
    err = rig.cni("ADD", rig.conf("1.0.0"), pod=pod).error(7)
    assert "deviceID" in err["details"]
    conf = rig.conf("1.0.0", deviceID=PCI)
    del conf["name"]
    rig.cni("ADD", conf, pod=pod).error(7)
    _untouched(rig, pod, before)


def test_netns_that_does_not_exist_is_never_created(setup):
    rig, pod, before = setup
    missing = f"/var/run/netns/{pod.name}-missing"
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), netns=missing).error(104)
    assert missing in err["details"]
    import os

    assert not os.path.exists(missing)
    rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), netns="/etc/hostname").error(104)
    _untouched(rig, pod, before)


def test_ifname_already_in_pod(setup):
    rig, pod, before = setup
    from netlab import ip

    ip("link", "add", "net1", "type", "veth", "peer", "name", "other1", ns=pod.name)
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod).error(103)
    assert "net1" in err["msg"]
    assert rig.state("ens5") == before and rig.leases() == []


def test_nic_already_in_another_namespace(setup):
    rig, pod, before = setup
    first = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=pod, container_id="first").ok()
    other = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI), pod=other, container_id="second").error(
        102
    )
    assert PCI in err["msg"]
    assert rig.has_link("net1", pod) and not rig.has_link("net1", other)
    assert rig.leases() == [first["ips"][0]["address"].split("/")[0]]
    # The runtime DELs the failed attachment: that must not take the first pod's NIC.
    rig.cni("DEL", rig.conf("1.0.0", deviceID=PCI), pod=other, container_id="second").ok()
    assert rig.has_link("net1", pod)
    rig.cni("DEL", rig.conf("1.0.0", deviceID=PCI), pod=pod, container_id="first").ok()
    _untouched(rig, pod, before)


@pytest.mark.parametrize("version", VERSIONS)
def test_missing_ipam_plugin(setup, version):
    rig, pod, before = setup
    conf = rig.conf(version, deviceID=PCI, ipam={"type": "no-such-ipam"})
    err = rig.cni("ADD", conf, pod=pod).error(105)
    assert err["cniVersion"] == version
    assert "no-such-ipam" in err["msg"]
    _untouched(rig, pod, before)


def test_ipam_config_invalid_for_the_real_plugin(setup):
    rig, pod, before = setup
    # host-local itself rejects this: its error code and message come through.
    conf = rig.conf(
        "1.0.0", deviceID=PCI, ipam={"type": "host-local", "dataDir": str(rig.ipam_dir)}
    )
    out = rig.cni("ADD", conf, pod=pod)
    assert out.rc != 0 and out.out["code"] != 0 and "host-local" in out.out["msg"]
    assert set(out.out) == {"cniVersion", "code", "msg", "details"}
    _untouched(rig, pod, before)


def test_stdout_is_only_json_even_with_debug_logging(setup, tmp_path):
    rig, pod, before = setup
    log = tmp_path / "ehost.log"
    rig.write_policy(logFile=str(log))
    conf = rig.conf("1.0.0", deviceID=PCI, logLevel="debug")
    run = rig.cni("ADD", conf, pod=pod)
    out = run.ok()
    assert json.loads(run.stdout) == out
    assert "ADD ctr1" in log.read_text()
    rig.cni("DEL", conf, pod=pod).ok()
    _untouched(rig, pod, before)
