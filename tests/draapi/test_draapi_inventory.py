"""From the node to the API: real veth NICs in a node namespace under a fake virtio PCI tree,
the daemon's Inventory reading them (discovery over netlink inside that namespace), its DRA
view (inventory.dra_device) and the publisher writing the slice to the test API server. A real
carrier loss (the cable's far end down) taints the device; hot-plug and unplug of a PCI function
add and remove it; a NIC moved into a pod keeps its host name and gets no taint while a prepared
claim holds it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Set

import pytest
from conftest import DRIVER, NODE, wait_for
from fakesysfs import FakeSysfs
from netlab import Netns, ip, namespaces, veth
from testapiserver import TestApiServer

from virtcore import claims, discovery, kubeapi, pools
from virtdp_serve import slices
from virtdp_serve.inventory import Inventory, dra_device


class Node:
    def __init__(self, root: Path, node: Netns, wire: Netns, kube: kubeapi.Kube) -> None:
        self.sysfs = FakeSysfs(root / "sys")
        self.node, self.wire = node, wire
        scanner = functools.partial(discovery.discover, netns=node.path)
        self.inventory = Inventory(str(self.sysfs.root), pools.load_config(None), scanner=scanner)
        self.publisher = slices.Publisher(kube, node=NODE, driver=DRIVER, backoff_max=0.5)
        self.held: Set[str] = set()

    def add_nic(self, pci_address: str, ifname: str) -> None:
        veth(self.node, ifname, self.wire, "w" + ifname)
        shown = ip("-j", "link", "show", ifname, ns=self.node.name).stdout
        mac = json.loads(shown)[0]["address"]
        self.sysfs.add_virtio_nic(pci_address, ifname, mac=mac, numa_node=0)

    def sync(self, *addresses: str) -> None:
        """What the daemon does after an event: refresh those devices, hand the DRA view on."""
        self.inventory.refresh("test", set(addresses) if addresses else None)
        devices = self.inventory.devices([p.resource_name for p in self.inventory.config.pools])
        self.publisher.update([dra_device(d, held=d.pci_address in self.held) for d in devices])


@pytest.fixture
def lab(tmp_path: Path, kube: kubeapi.Kube) -> Iterator[Node]:
    with namespaces("vdn", "vdw") as (node_ns, wire_ns):
        n = Node(tmp_path, node_ns, wire_ns, kube)
        n.publisher.start()
        try:
            yield n
        finally:
            n.publisher.stop()


def device(api: TestApiServer, pci_address: str) -> Dict[str, Any]:
    name = claims.device_name(pci_address)
    for s in api.list("resourceslices"):
        for d in s["spec"].get("devices") or []:
            if d["name"] == name:
                return d
    return {}


def taint_keys(api: TestApiServer, pci_address: str) -> Set[str]:
    return {t["key"] for t in device(api, pci_address).get("taints") or []}


def test_carrier_hotplug_unplug_and_pod(lab: Node, api: TestApiServer) -> None:
    lab.add_nic("0000:00:0a.0", "ens10")
    lab.add_nic("0000:00:0b.0", "ens11")
    lab.sync()
    wait_for(lambda: device(api, "0000:00:0b.0"), 5, "both NICs published")
    attrs = device(api, "0000:00:0a.0")["attributes"]
    assert attrs["ifName"] == {"string": "ens10"} and attrs["numaNode"] == {"int": 0}
    assert attrs["pciAddress"] == {"string": "0000:00:0a.0"}
    assert attrs["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:00"}
    assert attrs["vendorID"] == {"string": "0x1af4"} and attrs["deviceID"] == {"string": "0x1041"}
    assert taint_keys(api, "0000:00:0a.0") == set()

    ip("link", "set", "wens10", "down", ns=lab.wire.name)  # cable pulled: carrier lost
    lab.sync("0000:00:0a.0")
    wait_for(lambda: taint_keys(api, "0000:00:0a.0") == {f"{DRIVER}/no-carrier"}, 5, "tainted")
    assert taint_keys(api, "0000:00:0b.0") == set()
    ip("link", "set", "wens10", "up", ns=lab.wire.name)
    lab.sync("0000:00:0a.0")
    wait_for(lambda: taint_keys(api, "0000:00:0a.0") == set(), 5, "taint gone with carrier")

    lab.add_nic("0000:00:0c.0", "ens12")  # hot-plug
    lab.sync("0000:00:0c.0")
    wait_for(lambda: device(api, "0000:00:0c.0"), 5, "hot-plugged NIC published")

    lab.sysfs.remove_nic("0000:00:0c.0")  # unplug
    ip("link", "del", "ens12", ns=lab.node.name)
    lab.sync("0000:00:0c.0")
    wait_for(lambda: not device(api, "0000:00:0c.0"), 5, "unplugged NIC gone")

    # ens11 goes into a pod (what ehost-device does): held by a prepared claim, no taint, and
    # the slice keeps its host name; once no claim holds it, it is a NIC without its netdev.
    with Netns("vdp") as pod:
        lab.held.add("0000:00:0b.0")
        lab.sysfs.move_netdev_away("0000:00:0b.0")
        ip("link", "set", "ens11", "netns", pod.name, ns=lab.node.name)
        lab.sync("0000:00:0b.0")
        generation = lab.publisher.state()["generation"]
        wait_for(lambda: lab.publisher.wait_in_sync(0.1), 5, "in sync")
        assert taint_keys(api, "0000:00:0b.0") == set()
        assert device(api, "0000:00:0b.0")["attributes"]["ifName"] == {"string": "ens11"}
        assert lab.publisher.state()["generation"] == generation  # nothing a slice shows moved
        lab.held.clear()
        lab.sync("0000:00:0b.0")
        wait_for(lambda: taint_keys(api, "0000:00:0b.0") == {f"{DRIVER}/no-netdev"}, 5, "no-netdev")
