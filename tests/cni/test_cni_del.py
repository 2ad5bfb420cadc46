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


def test_del_gives_back_the_attachments_nic_when_the_config_names_another(rig):
    # containerd sends the conflist as it is at DEL time: here it was rewritten between the
    # two pods, and now names the second pod's NIC. The link at CNI_IFNAME in this pod that
    # carries our mark is this attachment's NIC: it goes home; the other pod's stays put.
    rig.nic(PCI, "ens5")
    rig.nic("0000:00:06.0", "ens6")
    before = rig.state("ens5")
    first, second = rig.pod(), rig.pod()
    conf_a = rig.conf("1.0.0", deviceID=PCI)
    conf_b = rig.conf("1.0.0", deviceID="0000:00:06.0")
    out_a = rig.cni("ADD", conf_a, pod=first, container_id="first").ok()
    rig.cni("ADD", conf_b, pod=second, container_id="second").ok()

    run = rig.cni("DEL", dict(conf_b, prevResult=out_a), pod=first, container_id="first")
    run.ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("net1", first)
    assert "not the NIC the config names now" in run.stderr
    assert rig.has_link("net1", second) and not rig.has_link("ens6")
    assert rig.state("net1", second)["alias"].startswith("virtdp/v1 host=ens6 pci=0000:00:06.0")
    assert len(rig.leases()) == 1  # only the second pod's lease is left

    rig.cni("DEL", conf_b, pod=second, container_id="second").ok()
    assert rig.has_link("ens6") and rig.leases() == []


def test_del_with_the_ipam_plugin_gone_gives_the_nic_back_and_succeeds(rig, tmp_path):
    # The IPAM binary vanished from CNI_PATH between ADD and DEL: the resource it would free
    # cannot be reached, so DEL completes (CNI spec: DEL succeeds when resources are already
    # missing) with a warning, after the NIC part. Its lease stays, as the warning says.
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.1.0", deviceID=PCI)
    rig.cni("ADD", conf, pod=pod).ok()
    empty = tmp_path / "no-ipam-here"
    empty.mkdir()

    run = rig.cni("DEL", conf, pod=pod, cni_path=str(empty))
    run.ok()
    assert rig.state("ens5") == before and not rig.has_link("net1", pod)
    assert "host-local" in run.stderr and "IPAM DEL is skipped" in run.stderr
    assert rig.leases() == ["198.51.100.2"]
    rig.cni("DEL", conf, pod=pod, cni_path=str(empty)).ok()  # and again: still success

    rig.cni("DEL", conf, pod=pod).ok()  # the plugin is back: its lease goes
    assert rig.leases() == []


def test_del_still_fails_when_the_ipam_plugin_runs_and_fails(rig):
    # Only a plugin that cannot be run at all counts as "already gone": one that runs and
    # fails may still hold the lease, and the runtime must hear about it (and retry).
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI)
    rig.cni("ADD", conf, pod=pod).ok()
    broken = dict(conf, ipam={"type": "host-local", "dataDir": str(rig.ipam_dir)})
    out = rig.cni("DEL", broken, pod=pod)
    assert out.rc != 0 and "host-local" in out.out["msg"], out
    assert rig.state("ens5") == before  # the NIC part completed all the same
    rig.cni("DEL", conf, pod=pod).ok()
    assert rig.leases() == []


def test_del_cut_short_after_the_rename_is_finished_by_the_next_del(rig):
    """A DEL killed (its process, or the executor) after it renamed the NIC back to its host
    name and reset it in the pod, before the move home: the runtime's next DEL finds it by its
    mark and finishes, in one move."""
    rig.nic(PCI, "ens5")
    before = rig.state("ens5")
    pod = rig.pod()
    conf = rig.conf("1.0.0", deviceID=PCI, mtu=1400, mac="02:00:00:00:05:09")
    out = rig.cni("ADD", conf, pod=pod).ok()
    # What the killed DEL had done: down, renamed, MTU and MAC reset, all in the pod.
    ip("link", "set", "net1", "down", ns=pod.name)
    ip("link", "set", "net1", "name", "ens5", ns=pod.name)
    ip("link", "set", "ens5", "mtu", str(before["mtu"]), ns=pod.name)
    ip("link", "set", "ens5", "address", before["mac"], ns=pod.name)
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before
    assert not rig.has_link("ens5", pod)
    assert rig.leases() == []

    # A link of the host name the config does not name (another NIC's mark) is left alone.
    out = rig.cni("ADD", conf, pod=pod).ok()
    ip("link", "set", "net1", "down", ns=pod.name)
    ip("link", "set", "net1", "name", "ens5", ns=pod.name)
    other = rig.conf("1.0.0", deviceID="0000:00:06.0")
    rig.cni("DEL", dict(other, prevResult=out), pod=pod).ok()
    assert rig.has_link("ens5", pod)
    rig.cni("DEL", dict(conf, prevResult=out), pod=pod).ok()
    assert rig.state("ens5") == before
