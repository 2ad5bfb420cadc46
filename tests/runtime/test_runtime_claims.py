"""Pods made by containerd's CRI whose NICs come by DRA claim: virtdp-serve has prepared a claim
reserved for the pod (claims.json in the node policy's draStateDir), and ehost-device, named in
the node's conflist without a device, takes the claimed NIC by the K8S_POD_UID containerd
passes in CNI_ARGS. Two ways: chained after the cluster network (ptp + host-local), and as the
conflist's own plugin (what a NAD without a resourceName is to Multus). Pod delete gives the NIC
back; pods without a claim pass through the chain untouched."""

from __future__ import annotations

import json

import grpc
import pytest
from claimlab import claim, device, status_files, statuses, write
from crilab import ctd_run
from netlab import tag
from toolrun import node_policy

from virtcore import alias

PCI_A, PCI_B = "0000:00:0a.0", "0000:00:0b.0"
CLUSTER = "192.0.2.0/24"
CLAIMED = "198.51.100.0/24"


@pytest.fixture
def pair(lab):
    return lab.nic_pair(PCI_A, "ens10", PCI_B, "ens11")


@pytest.fixture
def dra(lab):
    d = lab.tmp / "dra"
    d.mkdir()
    node_policy(lab.policy, str(lab.fake.root), draStateDir=str(d))
    return d


def ours(lab, dataDir: str = "ipam-claimed", **keys):
    return {
        "type": "ehost-device",
        "ipam": {
            "type": "host-local",
            "dataDir": str(lab.tmp / dataDir),
            "ranges": [[{"subnet": CLAIMED}]],
        },
        **keys,
    }


def cluster_network(lab):
    return {
        "type": "ptp",
        "ipam": {
            "type": "host-local",
            "dataDir": str(lab.tmp / "ipam-cluster"),
            "ranges": [[{"subnet": CLUSTER}]],
        },
    }


def leases(lab, data_dir: str):
    d = lab.tmp / data_dir / lab.network
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name != "lock" and "last_" not in p.name)


def links(pod):
    out = json.loads(ctd_run("nsenter", f"--net={pod.netns}", "ip", "-j", "link", "show"))
    return {link["ifname"]: link for link in out}


def uid_of(name: str) -> str:
    return f"uid-{name}"  # crilab's sandbox config


def test_chained_pods_get_their_claimed_nics_and_reach_each_other_over_them(lab, pair, dra):
    a, b = pair
    lab.write_chain([cluster_network(lab), ours(lab)])
    n1, n2, n3 = f"pa-{tag(4)}", f"pb-{tag(4)}", f"pc-{tag(4)}"
    write(
        dra,
        claim("nic-a", uid_of(n1), device(a.pci)),
        claim("nic-b", uid_of(n2), device(b.pci, interface_name="data0")),
    )
    p1, p2 = lab.run_pod(None, n1), lab.run_pod(None, n2)
    plain = lab.run_pod(None, n3)  # no claim: passes through the chain

    # The cluster network's eth0 is the pod IP; the claimed NICs come on top.
    for pod in (p1, p2, plain):
        assert pod.ip.startswith("192.0.2."), pod.ip
    assert set(links(p1)) >= {"lo", "eth0", "net1"}
    assert set(links(p2)) >= {"lo", "eth0", "data0"}
    assert set(links(plain)) == {"lo", "eth0"}
    m1 = alias.decode(links(p1)["net1"].get("ifalias"))
    m2 = alias.decode(links(p2)["data0"].get("ifalias"))
    assert m1 and (m1.pci_address, m1.pod, m1.attachment) == (a.pci, uid_of(n1), "eth0")
    assert m2 and (m2.pci_address, m2.pod) == (b.pci, uid_of(n2))
    assert not lab.has_link(a.name) and not lab.has_link(b.name)
    got = {s.pod_uid: s for s in statuses(dra)}
    assert sorted(got) == sorted([uid_of(n1), uid_of(n2)])
    assert got[uid_of(n1)].container_id == p1.id and got[uid_of(n1)].if_name == "eth0"
    (ip2,) = got[uid_of(n2)].ips
    assert got[uid_of(n2)].interface_name == "data0"

    # Over the claimed NICs (one wire): from a container of the first pod to the second's data0.
    box = lab.container(p1)
    ping = lab.cri.exec(box, ["ping", "-c", "1", "-W", "5", ip2.split("/")[0]])
    assert ping.exit_code == 0, (ping.stdout, ping.stderr)

    for pod in (p1, p2, plain):
        lab.stop_pod(pod)
        lab.remove_pod(pod)
    assert lab.home(a) and lab.home(b)
    assert statuses(dra) == [] and status_files(dra) == []
    assert leases(lab, "ipam-claimed") == [] and leases(lab, "ipam-cluster") == []
    assert lab.cni_cache() == []


def test_stop_gives_the_claimed_nic_back_and_remove_changes_nothing(lab, pair, dra):
    a, _ = pair
    lab.write_chain([cluster_network(lab), ours(lab)])
    name = f"pa-{tag(4)}"
    write(dra, claim("nic-a", uid_of(name), device(a.pci)))
    pod = lab.run_pod(None, name)
    assert "net1" in links(pod) and len(statuses(dra)) == 1
    lab.stop_pod(pod)  # DEL with the cached result: the NIC goes home, its status goes
    assert lab.home(a) and statuses(dra) == [] and leases(lab, "ipam-claimed") == []
    after = lab.nic_state(a)
    lab.remove_pod(pod)  # DEL again, no netns, no prevResult
    assert lab.nic_state(a) == after and lab.home(a)
    assert leases(lab, "ipam-cluster") == [] and lab.cni_cache() == []


def test_conflist_of_ehost_device_alone_takes_the_claimed_nic_as_eth0(lab, pair, dra):
    """What a NAD without a resourceName is to Multus: ehost-device is the attachment's own
    plugin, CNI_IFNAME is the interface, the claimed NIC becomes it."""
    a, b = pair
    lab.write_chain([lab.plugin_conf()])  # host-local in the lab's ipam dir, no deviceID
    name = f"pa-{tag(4)}"
    write(dra, claim("nic-a", uid_of(name), device(a.pci)))
    pod = lab.run_pod(None, name)
    assert lab.in_pod(pod, a) and lab.home(b)
    assert pod.ip and f"{pod.ip}/24" in lab.addresses(pod)
    (status,) = statuses(dra)
    assert (status.if_name, status.interface_name, status.ips) == (
        "eth0",
        "eth0",
        (f"{pod.ip}/24",),
    )
    lab.stop_pod(pod)
    lab.remove_pod(pod)
    assert lab.home(a) and lab.home(b) and statuses(dra) == [] and lab.leases() == []


def test_pod_without_a_claim_gets_no_sandbox_through_a_conflist_of_ehost_device_alone(
    lab, pair, dra
):
    a, b = pair
    lab.write_chain([lab.plugin_conf()])
    write(dra, claim("nic-a", uid_of("someone-else"), device(a.pci)))
    with pytest.raises(grpc.RpcError) as failed:
        lab.run_pod(None, f"pz-{tag(4)}")
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert "holds no NIC claimed from virtdp" in failed.value.details()
    assert lab.home(a) and lab.home(b) and lab.leases() == [] and status_files(dra) == []
    assert lab.cri.pods() == []
