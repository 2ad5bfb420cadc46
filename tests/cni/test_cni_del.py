"""DEL is best effort and idempotent: the IPAM lease always goes, the NIC comes back if it can."""

from __future__ import annotations

from netlab import ip

PCI = "0000:00:05.0"


def test_del_after_the_namespace_is_gone(rig):
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    out = rig.cni("ADD", conf, pod=pod).ok()
    assert rig.leases() == ["198.51.100.2"]
    path = pod.path
    pod.close()  # a veth dies with its namespace (a real NIC would go back to the host)
    rig.cni("DEL", dict(conf, prevResult=out), netns=path).ok()
    assert rig.leases() == []
    rig.cni("DEL", conf, netns=path).ok()


def test_del_without_netns_still_releases_the_lease(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.1.0", deviceID=PCI)
    rig.cni("ADD", conf, pod=pod).ok()
    # The runtime lost the namespace path: the NIC stays in the pod, but IPAM must still run.
    rig.cni("DEL", conf, netns="").ok()
    assert rig.leases() == []
    rig.cni("DEL", conf, pod=pod).ok()  # the real DEL brings the NIC home
    assert rig.state("ens5") == before


def test_nic_returned_under_another_name_is_found_by_its_mark(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, mtu=1400, mac="02:00:00:00:05:05")
    rig.cni("ADD", conf, pod=pod).ok()
    # What the kernel does when a namespace dies with a physical NIC inside and the name is
    # taken: the NIC reappears in the initial namespace as devN, its alias intact.
    ip("link", "set", "net1", "netns", rig.node.name, ns=pod.name)
    ip("link", "set", "net1", "name", "dev7", ns=rig.node.name)
    rig.fake.rename_netdev(PCI, "dev7")
    path = pod.path
    pod.close()
    assert rig.state("dev7")["alias"].startswith("virtdp/v1 host=ens5")

    rig.cni("DEL", conf, netns=path).ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("dev7")
    assert rig.leases() == []


def test_add_on_a_returned_nic_keeps_the_original_host_settings(rig):
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, mtu=1400, mac="02:00:00:00:05:05")
    rig.cni("ADD", conf, pod=pod, container_id="old").ok()
    ip("link", "set", "net1", "netns", rig.node.name, ns=pod.name)
    ip("link", "set", "net1", "name", "dev9", ns=rig.node.name)
    rig.fake.rename_netdev(PCI, "dev9")
    pod.close()
    # No DEL came for the dead pod. A new pod gets the NIC (found as dev9 through sysfs); its
    # mark, not its current name and settings, says what the host had.
    pod2 = rig.pod()
    plain = rig.conf("1.0.0", deviceID=PCI)
    rig.cni("ADD", plain, pod=pod2, container_id="new").ok()
    assert rig.state("net1", pod2)["alias"].startswith("virtdp/v1 host=ens5 ")
    rig.cni("DEL", plain, pod=pod2, container_id="new").ok()
    assert rig.state("ens5") == before
    rig.cni("DEL", conf, netns="", container_id="old").ok()  # the late DEL: lease released
    assert rig.state("ens5") == before
    assert rig.leases() == []


def test_del_leaves_a_foreign_interface_alone(rig):
    rig.nic(PCI, "ens5")
    pod = rig.pod()
    ip("link", "add", "net1", "type", "veth", "peer", "name", "x1", ns=pod.name)
    rig.cni("DEL", rig.conf("1.0.0", deviceID=PCI), pod=pod).ok()
    assert rig.has_link("net1", pod) and rig.has_link("ens5")
