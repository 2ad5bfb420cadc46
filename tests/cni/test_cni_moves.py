"""Names on the way in and out: a NIC moves in one request, renamed as it arrives, and no
namespace ever sees it under the other side's name, even when names collide.

ADD moves the NIC straight into the pod and renames it there in the same request; DEL renames
it in the pod and moves it home, except when the pod has a link of the host name (then it
goes through a namespace of its own). These tests put links with the colliding names in the
way and check that every NIC, ours and theirs, ends up where and as it should.
"""

from __future__ import annotations

import pytest
from netlab import Netns, ip, tag, veth

from virtcore import netns

PCI = "0000:00:05.0"


def _pod_link(pod: Netns, name: str) -> str:
    """A veth `name` of the pod's own (peer in the pod too); returns its MAC."""
    ip("link", "add", name, "type", "veth", "peer", "name", f"p{tag(6)}", ns=pod.name)
    return ip("-j", "link", "show", name, ns=pod.name).stdout


def test_pod_link_named_like_the_host_nic(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    theirs = _pod_link(pod, "ens5")
    conf = rig.conf("1.1.0", deviceID=PCI, mtu=1400, mac="02:00:00:00:05:07")
    out = rig.cni("ADD", conf, pod=pod).ok()
    assert out["interfaces"][0]["name"] == "net1"
    got = rig.state("net1", pod)
    assert (got["mac"], got["mtu"], got["up"]) == ("02:00:00:00:05:07", 1400, True)
    assert not rig.has_link("ens5")
    assert ip("-j", "link", "show", "ens5", ns=pod.name).stdout == theirs

    # DEL cannot rename it to ens5 in the pod: it goes home through a namespace of its own.
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", pod)
    assert ip("-j", "link", "show", "ens5", ns=pod.name).stdout == theirs
    assert rig.leases() == []


def test_rollback_when_the_pod_has_a_link_of_the_host_name(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    theirs = _pod_link(pod, "ens5")
    conf = rig.conf("1.0.0", deviceID=PCI, mtu=1400, mac="01:00:5e:00:00:01")  # multicast
    err = rig.cni("ADD", conf, pod=pod).error(107)
    assert "MAC" in err["details"]
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", pod)
    assert ip("-j", "link", "show", "ens5", ns=pod.name).stdout == theirs
    assert rig.leases() == []


def test_del_when_the_host_has_taken_the_name_leaves_the_nic_in_the_pod(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, mtu=1400)
    out = rig.cni("ADD", conf, pod=pod).ok()
    in_pod = rig.state("net1", pod)
    veth(rig.node, "ens5", rig.wire, f"w{tag(6)}")  # something else took the name meanwhile

    err = rig.cni("DEL", dict(conf, prevResult=out), pod=pod).error(107)
    assert "ens5" in err["msg"] and "stays put" in err["details"]
    assert rig.state("net1", pod) == in_pod  # renamed, reset and brought up again, in place
    assert rig.leases() == []  # DEL is best effort: the lease goes all the same

    ip("link", "del", "ens5", ns=rig.node.name)
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", pod)


@pytest.mark.parametrize("host_name_in_pod", [False, True])
def test_refused_move_and_rename_leaves_the_link_where_it_was(rig, host_name_in_pod):
    """The pod's interface name is taken: the kernel refuses the rename, maybe after moving
    the link (when its own name is free in the pod); either way it ends up back home."""
    rig.nic(PCI, "ens5", up=False)  # links move down (the plugin downs them first)
    before = rig.state("ens5")
    pod = rig.pod()
    taken = _pod_link(pod, "net1")
    if host_name_in_pod:
        _pod_link(pod, "ens5")
    with netns.open_ns(rig.node.path) as host, netns.open_ns(pod.path) as podr:
        nic = netns.link_by_name(host, "ens5")
        assert nic is not None
        with pytest.raises(netns.LinkExists):
            netns.move(host, nic, podr, pod.path, rig.node.path, name="net1")
    assert rig.state("ens5") == before
    assert ip("-j", "link", "show", "net1", ns=pod.name).stdout == taken
    assert rig.has_link("ens5", pod) == host_name_in_pod
