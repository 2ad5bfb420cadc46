"""The seed README's manual test, automated: two pods each get a virtio NIC as net1 whose PCI
address is the allocated device ID, they ping each other over it, virtdp-inspect shows it all,
and DEL gives everything back."""

from __future__ import annotations

import json
import subprocess

from nodelab import RES, Node
from toolrun import tool_command

from virtcore import devinfo


def inspect_json(*args: str) -> dict:
    proc = subprocess.run(
        tool_command("virtdp-inspect") + list(args) + ["-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_two_pods_get_net1_ping_each_other_and_give_it_back(node: Node, figures):
    pods = [node.new_pod("web-a"), node.new_pod("web-b")]
    for pod in pods:
        assert node.admit(pod) == node.pod_device_ids(pod)
    chosen = [p.devices[0] for p in pods]
    assert len(set(chosen)) == 2, chosen

    addresses = []
    for pod, dev in zip(pods, chosen):
        result = node.attach(pod).ok()
        [iface] = result["interfaces"]
        assert (iface["name"], iface["sandbox"]) == ("net1", pod.netns.path)
        # net1 is the allocated PCI function: same MAC as the NIC at that address, and the mark
        # ehost-device left names that address.
        link = node._link(pod.netns, "net1")
        assert link["address"] == node.nics[dev].mac == iface["mac"]
        assert link["ifalias"].startswith(f"virtdp/v1 host={node.nics[dev].host_ifname} pci={dev}")
        info = devinfo.load(str(node.devinfo_dir), RES, dev)
        assert info is not None and info.pci_address == dev
        [ipc] = result["ips"]
        assert ipc["address"] in node.netns_addresses(pod.netns, "net1")
        addresses.append(ipc["address"])
    node.account()

    # The seed's last step: the pods reach each other over their virtio NICs.
    for src, dst in ((pods[0], addresses[1]), (pods[1], addresses[0])):
        proc = node.ping(src, dst)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    alloc = inspect_json(
        "allocations",
        "--pod-resources-socket",
        node.pr_socket,
        "--sysfs-root",
        str(node.sysfs.root),
        "--netns",
        node.node.path,
    )
    rows = {r["pod"]: r for r in alloc["allocations"]}
    assert (alloc["source"], alloc["source_path"]) == ("pod-resources", node.pr_socket), alloc
    assert set(rows) == {"web-a", "web-b"}, alloc
    for pod, dev in zip(pods, chosen):
        row = rows[pod.name]
        assert (row["namespace"], row["container"], row["resource"]) == ("default", "app", RES)
        assert (row["device_id"], row["numa_node"]) == (dev, node.nics[dev].numa)
        assert (row["location"], row["netns"], row["ifname"], row["host_ifname"]) == (
            "pod",
            pod.netns.name,
            "net1",
            node.nics[dev].host_ifname,
        )

    found = inspect_json("netns")
    mine = {r["netns"]: r for r in found["nics"] if r["pci_address"] in node.nics}
    assert set(mine) == {p.netns.name for p in pods}, found
    for pod, dev, addr in zip(pods, chosen, addresses):
        nic = mine[pod.netns.name]
        assert (nic["ifname"], nic["host_ifname"], nic["pci_address"]) == (
            "net1",
            node.nics[dev].host_ifname,
            dev,
        )
        assert addr in nic["addresses"]

    for pod in list(pods):
        node.detach(pod).ok()
        node.account()
        node.release(pod)
    assert node.leases() == {}
    node.wait_advertised()
    # Capacity is back to 8: one more pod gets all eight.
    big = node.new_pod("big")
    assert sorted(node.admit(big, 8)) == sorted(node.nics)
    node.release(big)
    node.account()
    figures.add(scenarios_passed=1)
