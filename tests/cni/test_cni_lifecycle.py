"""ehost-device ADD, CHECK and DEL as a runtime drives them, for every supported CNI version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import VERSIONS, check_result_shape

PCI = "0000:00:05.0"


def test_version_lists_exactly_the_supported_versions(rig):
    for asked in ("0.3.1", "1.1.0"):
        r = rig.cni("VERSION", {"cniVersion": asked}).ok()
        assert r == {"cniVersion": asked, "supportedVersions": list(VERSIONS)}


def test_version_imports_nothing_but_lean_json():
    """Runtimes ask VERSION often: it loads no plugin machinery, not even json or socket."""
    code = (
        "import io, os, sys; os.environ['CNI_COMMAND'] = 'VERSION';"
        'sys.stdin = io.TextIOWrapper(io.BytesIO(b\'{"cniVersion": "1.0.0"}\'));'
        "from ehost_device.cli import main; rc = main();"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('ehost_device', 'virtcore', 'json', 'socket', 'logging'))), rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "ehost_device,ehost_device.cli,ehost_device.lean_json 0"


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_round_trip(rig, version):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf(version, deviceID=PCI, mtu=1400, mac="02:00:00:00:05:01")

    out = rig.cni("ADD", conf, pod=pod).ok()
    check_result_shape(out, version, "net1", pod.path)
    iface = out["interfaces"][0]
    assert iface["mac"] == "02:00:00:00:05:01"
    if version == "1.1.0":
        assert iface["pciID"] == PCI and iface["mtu"] == 1400
    assert [i["address"] for i in out["ips"]] == ["198.51.100.2/24"]
    assert out["routes"] == [{"dst": "203.0.113.0/24"}]
    # The NIC is in the pod under CNI_IFNAME, configured, and gone from the node.
    assert not rig.has_link("ens5")
    inside = rig.state("net1", pod)
    assert inside["mac"] == "02:00:00:00:05:01" and inside["mtu"] == 1400 and inside["up"]
    assert inside["alias"].startswith("virtdp/v1 host=ens5 pci=0000:00:05.0")
    assert rig.addresses("net1", pod) == ["198.51.100.2/24"]
    routes = subprocess.run(
        ["ip", "-n", pod.name, "route", "show", "203.0.113.0/24"], capture_output=True, text=True
    ).stdout
    assert "via 198.51.100.1 dev net1" in routes
    assert rig.leases() == ["198.51.100.2"]

    if version >= "0.4.0":
        rig.cni("CHECK", dict(conf, prevResult=out), pod=pod).ok()

    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", pod)
    assert rig.leases() == []
    # DEL again: nothing left to do is success.
    rig.cni("DEL", conf, pod=pod).ok()
    assert rig.state("ens5") == before


def test_ipv6_static_ipam_and_1_1_route_fields(rig):
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    ipam = {
        "type": "static",
        "addresses": [
            {"address": "198.51.100.7/24", "gateway": "198.51.100.1"},
            {"address": "2001:db8::7/64", "gateway": "2001:db8::1"},
        ],
        "routes": [{"dst": "203.0.113.0/24"}, {"dst": "2001:db8:1::/48"}],
        "dns": {"nameservers": ["198.51.100.53"]},
    }
    conf = rig.conf("1.1.0", ipam=ipam, deviceID=PCI)
    out = rig.cni("ADD", conf, pod=pod).ok()
    check_result_shape(out, "1.1.0", "net1", pod.path)
    assert out["dns"] == {"nameservers": ["198.51.100.53"]}
    assert sorted(rig.addresses("net1", pod)) == ["198.51.100.7/24", "2001:db8::7/64"]
    r6 = subprocess.run(
        ["ip", "-n", pod.name, "-6", "route", "show", "2001:db8:1::/48"],
        capture_output=True,
        text=True,
    ).stdout
    assert "via 2001:db8::1 dev net1" in r6
    rig.cni("CHECK", dict(conf, prevResult=out), pod=pod).ok()
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.has_link("ens5")


@pytest.mark.parametrize("how", ["pciBusID", "runtimeConfig", "device", "hwaddr"])
def test_other_ways_to_name_the_nic(rig, how):
    rig.nic(PCI, "ens5")
    mac = rig.state("ens5")["mac"]
    pod = rig.pod()
    key = {
        "pciBusID": {"pciBusID": PCI},
        "runtimeConfig": {"runtimeConfig": {"deviceID": PCI}},
        "device": {"device": "ens5"},
        "hwaddr": {"hwaddr": mac.upper()},
    }[how]
    conf = rig.conf("1.0.0", **key)
    out = rig.cni("ADD", conf, pod=pod).ok()
    assert out["interfaces"][0]["mac"] == mac
    assert rig.has_link("net1", pod)
    rig.cni("DEL", conf, pod=pod).ok()
    assert rig.has_link("ens5") and not rig.has_link("net1", pod)


def test_down_nic_comes_back_down_and_l2_only_without_ipam(rig):
    rig.nic(PCI, "ens5", up=False)
    before = rig.state("ens5")
    assert not before["up"]
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    del conf["ipam"]
    out = rig.cni("ADD", conf, pod=pod).ok()
    assert "ips" not in out
    assert rig.state("net1", pod)["up"]
    rig.cni("CHECK", dict(conf, prevResult=out), pod=pod).ok()
    rig.cni("DEL", conf, pod=pod).ok()
    assert rig.state("ens5") == before


def test_check_reports_what_drifted(rig):
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    out = rig.cni("ADD", conf, pod=pod).ok()
    subprocess.run(
        ["ip", "-n", pod.name, "addr", "del", "198.51.100.2/24", "dev", "net1"], check=True
    )
    err = rig.cni("CHECK", dict(conf, prevResult=out), pod=pod).error(108)
    assert "198.51.100.2/24" in err["msg"]
    wrong_mac = json.loads(json.dumps(out))
    wrong_mac["interfaces"][0]["mac"] = "02:00:00:00:00:99"
    err = rig.cni("CHECK", dict(conf, prevResult=wrong_mac), pod=pod).error(108)
    assert "MAC" in err["msg"]
    rig.cni("CHECK", conf, pod=pod).error(7)  # no prevResult
    rig.cni("CHECK", dict(conf, cniVersion="0.3.1", prevResult=out), pod=pod).error(1)
    rig.cni("DEL", conf, pod=pod).ok()


def test_status_and_gc(rig):
    conf = rig.conf("1.1.0")
    rig.cni("STATUS", conf).ok()
    # host-local predates STATUS/GC: ready when it answers VERSION; GC has nothing to forward.
    rig.cni("GC", dict(conf, **{"cni.dev/valid-attachments": []})).ok()
    rig.cni("STATUS", dict(conf, ipam={"type": "no-such-ipam"})).error(50)
    rig.write_policy(sysfsRoot=str(rig.tmp / "nowhere"))
    rig.cni("STATUS", conf).error(50)
    rig.write_policy()
    rig.cni("STATUS", rig.conf("1.0.0")).error(1)
    rig.cni("GC", dict(conf, **{"cni.dev/valid-attachments": "x"})).error(7)
