"""Discovery over fake virtio PCI trees, with link state read from real veths in a test netns."""

from __future__ import annotations

import os
import time

import pytest
from fakesysfs import FakeSysfs
from netlab import Netns, ip, namespaces, veth

from virtcore import discovery


@pytest.fixture
def peer():
    with namespaces("vdp") as (ns,):
        yield ns


def by_pci(nics):
    return {n.pci_address: n for n in nics}


def test_tree_shapes_are_read_with_link_state_from_netlink(fake_sysfs: FakeSysfs, netns, peer):
    veth(netns, "eth1", peer, "p1", mac="52:54:00:00:01:01")
    veth(netns, "eth2", peer, "p2", mac="52:54:00:00:01:02")
    veth(netns, "eth3", peer, "p3", mac="52:54:00:00:01:03")
    ip("link", "set", "eth3", "mtu", "1400", ns=netns.name)
    # Root bus, legacy device ID.
    fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1", legacy=True, mac="02:00:00:00:00:99")
    # q35: behind a PCIe root port.
    fake_sysfs.add_pci_bridge("0000:00:1c.0")
    fake_sysfs.add_virtio_nic(
        "0000:01:00.0", "eth2", parents=("pci0000:00", "0000:00:1c.0"), numa_node=0
    )
    # Behind a PCI bridge behind a root port.
    fake_sysfs.add_pci_bridge("0000:00:1c.1")
    fake_sysfs.add_pci_bridge(
        "0000:02:00.0", parents=("pci0000:00", "0000:00:1c.1"), device="0x000e"
    )
    fake_sysfs.add_virtio_nic(
        "0000:03:01.0", "eth3", parents=("pci0000:00", "0000:00:1c.1", "0000:02:00.0")
    )
    # Virtual netdevs and non-virtio NICs are no virtio NICs.
    fake_sysfs.add_virtual_netdev("lo")
    fake_sysfs.add_non_virtio_nic("0000:00:0d.0", "ens13")

    nics = discovery.discover(str(fake_sysfs), netns=netns.path)

    assert [n.pci_address for n in nics] == ["0000:00:0a.0", "0000:01:00.0", "0000:03:01.0"]
    legacy, rootport, bridged = nics
    assert (legacy.device, rootport.device, bridged.device) == ("0x1000", "0x1041", "0x1041")
    assert {n.vendor for n in nics} == {"0x1af4"}
    assert {n.driver for n in nics} == {"virtio_net"}
    assert [n.virtio_name for n in nics] == ["virtio0", "virtio1", "virtio2"]
    assert (rootport.numa_node, bridged.numa_node) == (0, -1)
    assert [n.ifname for n in nics] == ["eth1", "eth2", "eth3"]
    # MAC and MTU come from the kernel's link, not from the fake tree's files.
    assert [n.mac for n in nics] == ["52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:01:03"]
    assert [n.mtu for n in nics] == [1500, 1500, 1400]
    for n in nics:
        assert n.visible and n.admin_up and n.carrier is True and n.operstate == "up"
        assert n.ifindex and n.ifindex > 1
        assert not n.default_route
        assert n.eligible and n.excluded_reason is None
        assert n.problems == ()
        assert n.pool is None


def test_moved_unbound_broken_and_damaged_nics_are_reported_not_fatal(
    fake_sysfs: FakeSysfs, netns, peer
):
    veth(netns, "eth1", peer, "p1")
    fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1")
    # Moved into a pod: the netdev left this namespace and this sysfs view.
    fake_sysfs.add_virtio_nic("0000:00:0b.0", "eth4")
    fake_sysfs.move_netdev_away("0000:00:0b.0")
    # virtio_net unbound.
    fake_sysfs.add_virtio_nic("0000:00:0c.0", "eth5")
    fake_sysfs.unbind_driver("0000:00:0c.0")
    # The PCI bus link points nowhere; the virtio bus still names the function.
    fake_sysfs.add_virtio_nic("0000:00:0e.0")
    fake_sysfs.break_pci_link("0000:00:0e.0")
    # Attributes missing or unreadable.
    fake_sysfs.add_virtio_nic("0000:00:0f.0")
    fake_sysfs.remove_attribute("0000:00:0f.0", "numa_node")
    fake_sysfs.add_virtio_nic("0000:00:10.0")
    fake_sysfs.make_unreadable("0000:00:10.0", "device")
    # sysfs names a netdev this namespace does not have.
    fake_sysfs.add_virtio_nic("0000:00:11.0", "ghost0")

    nics = by_pci(discovery.discover(str(fake_sysfs), netns=netns.path))

    assert sorted(nics) == [
        "0000:00:0a.0",
        "0000:00:0b.0",
        "0000:00:0c.0",
        "0000:00:0e.0",
        "0000:00:0f.0",
        "0000:00:10.0",
        "0000:00:11.0",
    ]
    assert nics["0000:00:0a.0"].visible and nics["0000:00:0a.0"].eligible

    moved = nics["0000:00:0b.0"]
    assert not moved.visible and moved.ifname is None and moved.mac is None
    assert moved.eligible, "a NIC in a pod is still the node's device"
    assert moved.problems == ()

    unbound = nics["0000:00:0c.0"]
    assert unbound.driver is None and not unbound.eligible
    assert "no driver bound" in unbound.excluded_reason

    broken = nics["0000:00:0e.0"]
    assert not broken.eligible and broken.vendor is None
    assert "PCI device link is broken" in broken.problems
    assert "unreadable" in broken.excluded_reason

    no_numa = nics["0000:00:0f.0"]
    assert no_numa.numa_node is None and no_numa.eligible
    assert any("numa_node" in p for p in no_numa.problems)

    unreadable = nics["0000:00:10.0"]
    assert unreadable.device is None and not unreadable.eligible
    assert any("PCI device ID" in p for p in unreadable.problems)

    ghost = nics["0000:00:11.0"]
    assert not ghost.visible and ghost.eligible
    assert any("ghost0" in p for p in ghost.problems)


def test_admin_state_and_carrier(fake_sysfs: FakeSysfs, netns, peer):
    veth(netns, "eth1", peer, "p1")
    veth(netns, "eth2", peer, "p2", up=False)
    ip("link", "set", "p1", "down", ns=peer.name)  # cable pulled: admin up, no carrier
    fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1")
    fake_sysfs.add_virtio_nic("0000:00:0b.0", "eth2")

    cable_pulled, down = discovery.discover(str(fake_sysfs), netns=netns.path)
    # The kernel's linkwatch updates operstate asynchronously (up to a second); carrier at once.
    assert cable_pulled.admin_up is True and cable_pulled.carrier is False
    deadline = time.monotonic() + 3
    while cable_pulled.operstate == "up" and time.monotonic() < deadline:
        time.sleep(0.05)
        cable_pulled, down = discovery.discover(str(fake_sysfs), netns=netns.path)
    assert cable_pulled.operstate in ("down", "lowerlayerdown")  # veth says "down"
    assert down.admin_up is False and down.operstate == "down"
    assert cable_pulled.eligible and down.eligible


def test_missing_namespace_is_an_error_and_is_not_created(fake_sysfs: FakeSysfs):
    path = f"/var/run/netns/vdmissing-{os.getpid()}"
    with pytest.raises(discovery.DiscoveryError, match=path):
        discovery.discover(str(fake_sysfs), netns=path)
    assert not os.path.exists(path)


def test_a_tree_without_pci_bus_is_an_error(tmp_path):
    with pytest.raises(discovery.DiscoveryError, match="no bus/pci/devices"):
        discovery.discover(str(tmp_path))


def test_real_sysfs_lists_eth0_excluded_for_the_default_route():
    """This machine's own eth0 (virtio_net at 0000:00:03.0) carries the default route."""
    nics = by_pci(discovery.discover("/sys"))
    eth0 = nics["0000:00:03.0"]
    assert eth0.ifname == "eth0" and eth0.visible
    assert eth0.driver == "virtio_net" and eth0.vendor == "0x1af4"
    assert eth0.default_route and not eth0.eligible
    assert "default route" in eth0.excluded_reason


def test_real_pci_tree_seen_from_a_fresh_namespace_shows_eth0_not_visible(netns: Netns):
    eth0 = by_pci(discovery.discover("/sys", netns=netns.path))["0000:00:03.0"]
    assert not eth0.visible and eth0.ifname is None and not eth0.default_route
