"""ehost-device against what libcni, its skel and Multus actually send and expect.

Each test pins one point where the plugin once differed from the CNI spec 1.1 or from the
reference implementations (containernetworking/cni libcni + pkg/skel, the host-device plugin,
Multus), so that runtimes driving it through libcni see what they see from any Go plugin.
"""

from __future__ import annotations

import pytest
from conftest import VERSIONS, check_result_shape

PCI = "0000:00:05.0"


@pytest.mark.parametrize("stdin", ['{"cniVersion": ""}', "{}", "", '{"cniVersion": 5}', "{x"])
def test_version_answer_always_decodes_in_libcni(rig, stdin):
    # libcni's GetVersionInfo sends dummy NETNS/IFNAME/PATH; its PluginDecoder rejects an
    # answer whose cniVersion is empty or whose supportedVersions is missing.
    env = {"CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy"}
    out = rig.cni("VERSION", stdin, env=env).ok()
    assert out == {"cniVersion": "1.1.0", "supportedVersions": list(VERSIONS)}


def test_environment_is_checked_before_stdin(rig):
    pod = rig.pod()
    # skel order: a missing variable is reported even when stdin is garbage (code 4, not 6)...
    err = rig.cni("ADD", "{not json", pod=pod, drop=("CNI_NETNS",)).error(4)
    assert "CNI_NETNS" in err["msg"]
    # ...and the error still speaks the config's version when the config is readable.
    conf = rig.conf("0.4.0", deviceID=PCI)
    err = rig.cni("ADD", conf, pod=pod, drop=("CNI_CONTAINERID",)).error(4)
    assert err["cniVersion"] == "0.4.0" and "CNI_CONTAINERID" in err["msg"]


@pytest.mark.parametrize("name", ["../vnet", "-vnet", "v net", "vnet/1"])
def test_network_name_follows_the_spec(rig, name):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI, name=name), pod=pod).error(7)
    assert "name" in err["msg"] and repr(name) in err["details"]
    assert rig.state("ens5") == before and rig.leases() == []


@pytest.mark.parametrize("version", ["0.3.1", "1.1.0"])
def test_mac_capability_from_runtime_config(rig, version):
    # Multus passes a pod's requested MAC as runtimeConfig.mac (capability "mac"); it
    # overrides the config's own `mac`, as in the tuning and sriov plugins.
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf(
        version,
        deviceID=PCI,
        mac="02:00:00:00:05:01",
        capabilities={"mac": True},
        runtimeConfig={"mac": "02:00:00:00:05:AA"},
    )
    out = rig.cni("ADD", conf, pod=pod).ok()
    check_result_shape(out, version, "net1", pod.path)
    assert out["interfaces"][0]["mac"] == "02:00:00:00:05:aa"
    assert rig.state("net1", pod)["mac"] == "02:00:00:00:05:aa"
    if version >= "0.4.0":
        rig.cni("CHECK", dict(conf, prevResult=out), pod=pod).ok()
    rig.cni("DEL", conf, pod=pod).ok()
    assert rig.state("ens5") == before


def test_dns_from_the_network_config(rig):
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    dns = {"nameservers": ["198.51.100.53"], "search": ["example.test"]}
    # host-local returns no DNS: the config's `dns` is what the result carries (host-device).
    conf = rig.conf("1.0.0", deviceID=PCI, dns=dns)
    out = rig.cni("ADD", conf, pod=pod).ok()
    assert out["dns"] == dns
    rig.cni("DEL", conf, pod=pod).ok()
    # Without one in the config, the IPAM plugin's DNS comes through.
    ipam = {
        "type": "static",
        "addresses": [{"address": "198.51.100.9/24"}],
        "dns": {"nameservers": ["203.0.113.53"]},
    }
    out = rig.cni("ADD", rig.conf("1.0.0", deviceID=PCI, ipam=ipam), pod=pod).ok()
    assert out["dns"] == {"nameservers": ["203.0.113.53"]}
    rig.cni("DEL", rig.conf("1.0.0", deviceID=PCI, ipam=ipam), pod=pod).ok()
    assert rig.has_link("ens5")


def test_own_network_namespace_is_refused(rig):
    # CNI_NETNS naming the namespace the plugin runs in (the host's): skel refuses it with
    # code 8; ehost-device refuses before touching the NIC, which would only be renamed.
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    conf = rig.conf("1.0.0", deviceID=PCI)
    err = rig.cni("ADD", conf, netns=rig.node.path).error(8)
    assert rig.node.path in err["details"]
    assert rig.state("ens5") == before and rig.leases() == []
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "net1", "sandbox": rig.node.path}]}
    rig.cni("CHECK", dict(conf, prevResult=prev), netns=rig.node.path).error(8)
    # DEL stays best effort: nothing to give back, success, nothing touched.
    rig.cni("DEL", conf, netns=rig.node.path).ok()
    assert rig.state("ens5") == before


def test_del_with_own_netns_still_finds_a_stray_nic_on_the_host(rig):
    # A pod namespace that died hands the NIC back to the host under its pod name, marked;
    # a DEL that names the host namespace must still return it, not leave it as net1.
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    rig.cni("ADD", conf, pod=pod).ok()
    from netlab import ip

    ip("link", "set", "net1", "netns", rig.node.name, ns=pod.name)  # as if the pod died
    assert rig.has_link("net1")
    rig.cni("DEL", conf, netns=rig.node.path).ok()
    assert rig.state("ens5") == before and not rig.has_link("net1")
    assert rig.leases() == []


def test_status_with_ipam_needs_cni_path(rig):
    err = rig.cni("STATUS", rig.conf("1.1.0"), drop=("CNI_PATH",)).error(4)
    assert "CNI_PATH" in err["msg"]
    rig.cni("STATUS", rig.conf("1.1.0", ipam={}), drop=("CNI_PATH",)).ok()
