"""Which NICs the node uses itself (default routes, routed addresses), read over netlink in
network namespaces the test creates: the rule of `discovery.exclusion`."""

from __future__ import annotations

import json
import sys

import pytest
from fakesysfs import FakeSysfs
from netlab import ip, namespaces, veth

from virtcore import discovery, netlink


@pytest.fixture
def lab(fake_sysfs: FakeSysfs, netns):
    """eth1 and eth2 in `netns`, each an up veth to a peer namespace with only its link-local
    IPv6 address, and a fake PCI tree naming them as virtio NICs 0000:00:0a.0 and 0000:00:0b.0.
    Routes go out through a device (`dev`), so no address is needed to add them."""
    with namespaces("vdr") as (peer,):
        veth(netns, "eth1", peer, "p1")
        veth(netns, "eth2", peer, "p2")
        fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1")
        fake_sysfs.add_virtio_nic("0000:00:0b.0", "eth2")
        yield fake_sysfs, netns


def nics(lab):
    tree, ns = lab
    return {n.ifname: n for n in discovery.discover(str(tree), netns=ns.path)}


def test_no_default_route_both_eligible(lab):
    _, ns = lab
    ip("route", "add", "192.0.2.0/24", "dev", "eth1", ns=ns.name)  # not a default
    ip("-6", "route", "add", "2001:db8:9::/48", "dev", "eth2", ns=ns.name)
    found = nics(lab)
    assert not found["eth1"].default_route and found["eth1"].eligible
    assert not found["eth2"].default_route and found["eth2"].eligible


def test_ipv4_default_route_excludes_its_nic_only(lab):
    _, ns = lab
    ip("route", "add", "default", "dev", "eth1", ns=ns.name)
    found = nics(lab)
    assert found["eth1"].default_route and not found["eth1"].eligible
    assert found["eth1"].excluded_reason == "carries the IPv4 default route"
    assert not found["eth2"].default_route and found["eth2"].eligible


def test_ipv6_default_route_excludes_its_nic_only(lab):
    _, ns = lab
    ip("-6", "route", "add", "default", "dev", "eth2", ns=ns.name)
    found = nics(lab)
    assert found["eth2"].default_route and not found["eth2"].eligible
    assert found["eth2"].excluded_reason == "carries the IPv6 default route"
    assert found["eth1"].eligible


def test_both_families(lab):
    _, ns = lab
    ip("route", "add", "default", "dev", "eth1", ns=ns.name)
    ip("-6", "route", "add", "default", "dev", "eth1", ns=ns.name)
    found = nics(lab)
    assert found["eth1"].excluded_reason == "carries the IPv4 and IPv6 default route"


def test_default_route_in_another_table_counts(lab):
    _, ns = lab
    ip("route", "add", "default", "dev", "eth2", "table", "100", ns=ns.name)
    found = nics(lab)
    assert found["eth2"].default_route and not found["eth2"].eligible
    assert found["eth1"].eligible


def test_multipath_default_route_excludes_every_nexthop(lab):
    _, ns = lab
    ip(
        "route", "add", "default",
        "nexthop", "dev", "eth1",
        "nexthop", "dev", "eth2",
        ns=ns.name,
    )  # fmt: skip
    found = nics(lab)
    assert found["eth1"].default_route and found["eth2"].default_route
    assert not found["eth1"].eligible and not found["eth2"].eligible


def test_unreachable_default_has_no_interface(lab):
    _, ns = lab
    ip("route", "add", "unreachable", "default", ns=ns.name)
    found = nics(lab)
    assert found["eth1"].eligible and found["eth2"].eligible


def test_snapshot_maps_ifindex_to_families(lab):
    _, ns = lab
    ip("route", "add", "default", "dev", "eth2", ns=ns.name)
    ip("-6", "route", "add", "default", "dev", "eth2", ns=ns.name)
    snap = netlink.snapshot(netns=ns.path)
    eth2 = snap.by_name()["eth2"]
    assert snap.default_routes == {eth2.index: ("IPv4", "IPv6")}
    assert snap.default_route_ifindexes == frozenset({eth2.index})


def test_an_address_the_node_routes_with_excludes_its_nic(lab):
    _, ns = lab
    ip("addr", "add", "198.51.100.2/24", "dev", "eth1", ns=ns.name)
    ip("-6", "addr", "add", "2001:db8:2::2/64", "dev", "eth2", "nodad", ns=ns.name)
    found = nics(lab)
    assert not found["eth1"].default_route and not found["eth1"].eligible
    assert found["eth1"].excluded_reason == "the node routes through its address 198.51.100.2/24"
    assert found["eth2"].excluded_reason == "the node routes through its address 2001:db8:2::2/64"
    # Link-local addresses only (every up veth has one): the NIC may go again.
    ip("addr", "flush", "dev", "eth1", "scope", "global", ns=ns.name)
    assert nics(lab)["eth1"].eligible


def test_both_readers_agree(lab):
    """Read from inside the namespace (virtdp-serve, ehost-device) and from outside it through a
    socket made there (--netns: virtdp-discover, virtdp-inspect), the same routes and addresses,
    IPv4 and IPv6."""
    tree, ns = lab
    ip("addr", "add", "198.51.100.2/24", "dev", "eth1", ns=ns.name)
    ip("-6", "addr", "add", "2001:db8:1::2/64", "dev", "eth1", "nodad", ns=ns.name)
    ip("-6", "route", "add", "default", "dev", "eth2", "table", "100", ns=ns.name)
    code = (
        "import json; from virtcore import netlink; s = netlink.snapshot(); "
        "print(json.dumps([dict(s.default_routes), dict(s.addresses_in_use)]))"
    )
    here = json.loads(ns.exec(sys.executable, "-c", code).stdout)
    snap = netlink.snapshot(netns=ns.path)
    there = [dict(snap.default_routes), dict(snap.addresses_in_use)]
    assert json.loads(json.dumps(there)) == here
    eth1 = snap.by_name()["eth1"]
    assert snap.addresses_in_use[eth1.index] == ("198.51.100.2/24", "2001:db8:1::2/64")
