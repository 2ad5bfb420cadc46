"""NICs by DRA claim: a network config that names no device takes the pod's claimed NICs
(K8S_POD_UID in CNI_ARGS, claims.json in the node policy's draStateDir), through a NAD without
a resourceName (one attachment, one NIC) or chained after the cluster network in a conflist
(every claimed NIC; pods without claims pass through). Conflists run as libcni runs them
(cnilist), with Debian's ptp + host-local as the cluster network. Bad input is in
test_cni_claims_badinput.py and tests/corpus/cni/claims-*.json."""

from __future__ import annotations

import json

import pytest
from claimlab import claim, cni_args, device, new_uid, status_files, statuses, write
from claimrig import A, B, C, cluster, cluster_leases, home, mark
from conftest import VERSIONS, check_result_shape
from netlab import ip, tag, veth

from virtcore import alias, claims

# -- through a NAD ------------------------------------------------------------------------------


def test_nad_attachment_takes_the_pods_claimed_nic(rig, dra, nics):
    uid = new_uid()
    mine = claim("nic-a", uid, device(A))
    write(dra, mine, claim("nic-b", new_uid(), device(B)))  # another pod's claim
    pod = rig.pod()
    conf = rig.conf("1.1.0")  # names no device
    out = rig.cni("ADD", conf, pod=pod, env=cni_args(uid)).ok()
    check_result_shape(out, "1.1.0", "net1", pod.path)
    assert out["interfaces"][0]["pciID"] == A
    assert rig.has_link("net1", pod) and not rig.has_link("ens5")
    assert home(rig, nics, B, C)
    m = mark(rig, "net1", pod)
    assert (m.pci_address, m.pod, m.claim, m.attachment) == (A, uid, mine.uid, "net1")
    assert rig.addresses("net1", pod) == ["198.51.100.2/24"]

    (status,) = statuses(dra)
    assert status == claims.DeviceStatus(
        claim_uid=mine.uid,
        claim_namespace="default",
        claim_name="nic-a",
        driver=claims.DEFAULT_DRIVER,
        pool="node-a",
        device="pci-0000-00-05-0",
        pod_uid=uid,
        container_id="ctr1",
        if_name="net1",
        interface_name="net1",
        ips=("198.51.100.2/24",),
        hardware_address=rig.state("net1", pod)["mac"],
    )
    rig.cni("CHECK", dict(conf, prevResult=out), pod=pod, env=cni_args(uid)).ok()

    rig.cni("DEL", dict(conf, prevResult=out), pod=pod, env=cni_args(uid)).ok()
    assert home(rig, nics, A, B, C)
    assert statuses(dra) == [] and rig.leases() == []
    rig.cni("DEL", conf, netns="", env=cni_args(uid)).ok()  # containerd's second DEL
    assert home(rig, nics, A, B, C)


def test_nad_attachments_take_claimed_nics_by_name_then_in_claim_order(rig, dra, nics):
    uid = new_uid()
    first = claim("a", uid, device(C, "nic"), device(A, "zz", interface_name="fast0"))
    second = claim("b", uid, device(B, "nic"))
    write(dra, second, first)
    pod = rig.pod()
    # Three attachments of one NAD: the same routes thrice would clash (as with deviceIDs).
    conf = rig.conf("1.0.0", ipam=rig.host_local(routes=[]))
    env = cni_args(uid)
    for ifname, pci in (("net1", C), ("fast0", A), ("net2", B)):
        out = rig.cni("ADD", conf, pod=pod, ifname=ifname, container_id="sb1", env=env).ok()
        assert out["interfaces"][0]["name"] == ifname
        assert mark(rig, ifname, pod).pci_address == pci, ifname
    assert sorted(s.interface_name for s in statuses(dra)) == ["fast0", "net1", "net2"]

    err = rig.cni("ADD", conf, pod=pod, ifname="net3", container_id="sb1", env=env).error(112)
    assert "net3" in err["msg"]
    for what in ("claim default/a", "named fast0 by its claim", "claim default/b", "in the pod"):
        assert what in err["details"], err

    # Each DEL gives back its own attachment's NIC only.
    rig.cni("DEL", conf, pod=pod, ifname="net2", container_id="sb1", env=env).ok()
    assert home(rig, nics, B) and not rig.has_link("ens5") and not rig.has_link("ens7")
    assert sorted(s.interface_name for s in statuses(dra)) == ["fast0", "net1"]
    for ifname in ("fast0", "net1"):
        rig.cni("DEL", conf, pod=pod, ifname=ifname, container_id="sb1", env=env).ok()
    assert home(rig, nics, A, B, C) and statuses(dra) == [] and rig.leases() == []


# -- chained after the cluster network ----------------------------------------------------------


def test_chained_pod_gets_every_claimed_nic_after_the_cluster_network(rig, dra, nics):
    uid = new_uid()
    c1 = claim("c1", uid, device(A))
    c2 = claim("c2", uid, device(B, interface_name="data0"))
    c3 = claim("c3", uid, device(C))
    write(dra, c3, c1, c2)
    pod = rig.pod()
    net = cluster(rig)
    out = net.add(pod=pod, env=cni_args(uid))

    ptp = net.runs[0][2].out
    assert net.runs[0][1] == "ptp"
    # The cluster network's result, as is, then ours.
    n = len(ptp["interfaces"])
    assert out["interfaces"][:n] == ptp["interfaces"]
    assert out["ips"][: len(ptp["ips"])] == ptp["ips"]
    assert out.get("routes", [])[: len(ptp.get("routes", []))] == ptp.get("routes", [])
    assert out["dns"] == ptp["dns"]
    ours = out["interfaces"][n:]
    assert [i["name"] for i in ours] == ["net1", "data0", "net2"]
    assert all(i["sandbox"] == pod.path for i in ours)
    ips = out["ips"][len(ptp["ips"]) :]
    assert [(ip_["interface"], ip_["address"]) for ip_ in ips] == [
        (n, "198.51.100.2/24"),
        (n + 1, "198.51.100.3/24"),
        (n + 2, "198.51.100.4/24"),
    ]
    assert rig.has_link("eth0", pod)  # the cluster network's, untouched
    for name, pci, cl in (("net1", A, c1), ("data0", B, c2), ("net2", C, c3)):
        m = mark(rig, name, pod)
        assert (m.pci_address, m.pod, m.claim, m.attachment) == (pci, uid, cl.uid, "eth0")
    got = {s.interface_name: s for s in statuses(dra)}
    assert sorted(got) == ["data0", "net1", "net2"]
    assert {s.if_name for s in got.values()} == {"eth0"}
    assert got["data0"].ips == ("198.51.100.3/24",)

    net.check("ehost-device", pod=pod, env=cni_args(uid))

    net.delete(pod=pod, env=cni_args(uid))
    assert home(rig, nics, A, B, C)
    assert statuses(dra) == [] and rig.leases() == [] and cluster_leases(rig) == []
    net.delete(netns="", env=cni_args(uid))  # the second DEL: no netns, no prevResult
    assert home(rig, nics, A, B, C)


@pytest.mark.parametrize("version", VERSIONS)
def test_chained_passes_pods_without_claims_through_untouched(rig, dra, nics, version):
    write(dra, claim("someone-elses", new_uid(), device(A)))
    prev = {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/x"}],
        "ips": [{"address": "192.0.2.7/24", "interface": 0, "gateway": "192.0.2.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["192.0.2.53"]},
        "x-unknown": {"kept": True},  # as is: nothing dropped
    }
    if version < "1.0.0":
        prev["ips"][0]["version"] = "4"
    conf = rig.conf(version, prevResult=prev)
    pod = rig.pod()
    for env in (cni_args(new_uid()), cni_args(None)):
        out = rig.cni("ADD", conf, pod=pod, ifname="eth0", env=env).ok()
        assert out == prev
        rig.cni("DEL", conf, pod=pod, ifname="eth0", env=env).ok()
    (dra / "claims.json").unlink()  # a node where nothing was ever prepared
    out = rig.cni("ADD", conf, pod=pod, ifname="eth0", env=cni_args(new_uid())).ok()
    assert out == prev
    assert home(rig, nics, A, B, C) and rig.leases() == [] and status_files(dra) == []
    links = json.loads(ip("-j", "link", "show", ns=pod.name).stdout)
    assert [link["ifname"] for link in links] == ["lo"]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_chained_conflist_without_claims_answers_the_cluster_networks_result(
    rig, dra, nics, version
):
    write(dra, claim("someone-elses", new_uid(), device(A)))
    pod = rig.pod()
    net = cluster(rig, version)
    uid = new_uid()
    out = net.add(pod=pod, env=cni_args(uid))
    assert out == net.runs[0][2].out  # ptp's result, as is
    if version >= "0.4.0":
        net.check(pod=pod, env=cni_args(uid))
    net.delete(pod=pod, env=cni_args(uid))
    assert home(rig, nics, A, B, C) and cluster_leases(rig) == [] and status_files(dra) == []


def test_chained_names_skip_names_in_use(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second")))
    pod = rig.pod()
    veth(pod, "net1", rig.wire, f"w{tag(6)}")  # the pod has a net1 already
    net = cluster(rig)
    out = net.add(pod=pod, env=cni_args(uid))
    assert [i["name"] for i in out["interfaces"][-2:]] == ["net2", "net3"]
    assert mark(rig, "net2", pod).pci_address == A and mark(rig, "net3", pod).pci_address == B
    assert alias.decode(rig.state("net1", pod)["alias"]) is None  # the pod's own, untouched
    net.delete(pod=pod, env=cni_args(uid))
    assert home(rig, nics, A, B) and rig.has_link("net1", pod)


def test_chained_del_after_the_pod_namespace_died(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second", interface_name="data0")))
    pod = rig.pod()
    net = cluster(rig)
    net.add(pod=pod, env=cni_args(uid))
    # What the kernel does when the namespace dies: physical NICs come back to the host under
    # their pod names, or as devN when that name is taken there.
    veth(rig.node, "net1", rig.wire, f"w{tag(6)}")  # the host has a net1 of its own
    ip("link", "set", "net1", "name", "dev4", ns=pod.name)
    ip("link", "set", "dev4", "netns", rig.node.name, ns=pod.name)
    ip("link", "set", "data0", "netns", rig.node.name, ns=pod.name)
    rig.fake.rename_netdev(A, "dev4")
    rig.fake.rename_netdev(B, "data0")
    path = pod.path
    pod.close()

    net.delete(netns=path, env=cni_args(uid))
    assert rig.state("ens5") == nics[A][1] and rig.state("ens6") == nics[B][1]
    assert not rig.has_link("dev4") and not rig.has_link("data0")
    assert rig.has_link("net1")  # the host's own
    assert statuses(dra) == [] and rig.leases() == [] and cluster_leases(rig) == []
    net.delete(netns="", env=cni_args(uid))


def test_del_with_todays_config_naming_a_device_still_gives_the_claimed_nic_back(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A)))
    pod = rig.pod()
    env = cni_args(uid)
    out = rig.cni("ADD", rig.conf("1.0.0"), pod=pod, env=env).ok()
    # The NAD now names B (containerd and Multus send the config as it is at DEL time).
    today = rig.conf("1.0.0", deviceID=B, prevResult=out)
    rig.cni("DEL", today, pod=pod, env=env).ok()
    assert home(rig, nics, A, B, C)
    assert statuses(dra) == [] and rig.leases() == []


def test_chained_del_with_todays_conflist_lacking_ehost_device_leaves_nothing_behind(
    rig, dra, nics
):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A)))
    pod = rig.pod()
    net = cluster(rig)
    net.add(pod=pod, env=cni_args(uid))
    # Today's conflist is the cluster network alone: its DEL does not reach us, and the NIC
    # stays in the pod until a DEL of ours with the pod's UID and attachment comes.
    net.conflist["plugins"] = net.conflist["plugins"][:1]
    net.delete(pod=pod, env=cni_args(uid))
    assert rig.has_link("net1", pod)
    rig.cni("DEL", rig.conf("1.0.0"), pod=pod, ifname="eth0", env=cni_args(uid)).ok()
    assert home(rig, nics, A) and statuses(dra) == [] and rig.leases() == []


def test_check_finds_a_chained_nic_gone_wrong(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second")))
    pod = rig.pod()
    net = cluster(rig)
    net.add(pod=pod, env=cni_args(uid))
    net.check("ehost-device", pod=pod, env=cni_args(uid))
    ip("link", "set", "net2", "down", ns=pod.name)
    with pytest.raises(AssertionError) as failed:
        net.check("ehost-device", pod=pod, env=cni_args(uid))
    run = net.runs[-1][2]
    assert net.runs[-1][1] == "ehost-device" and run.out["code"] == 108, failed.value
    assert "net2 is down" in run.out["msg"]
    ip("link", "set", "net2", "up", ns=pod.name)
    # A claim prepared for the pod after its ADD: CHECK says its NIC is missing.
    write(dra, claim("c1", uid, device(A), device(B, "second")), claim("late", uid, device(C)))
    with pytest.raises(AssertionError):
        net.check("ehost-device", pod=pod, env=cni_args(uid))
    assert "claim default/late" in net.runs[-1][2].out["msg"]
    net.delete(pod=pod, env=cni_args(uid))
    assert home(rig, nics, A, B, C)


def test_gc_drops_the_status_of_a_gone_attachment_whose_nic_is_home(rig, dra, nics):
    uid = new_uid()
    mine = claim("c1", uid, device(A))
    gone = claim("gone", new_uid(), device(B))
    write(dra, mine, gone)
    pod = rig.pod()
    conf = rig.conf("1.1.0")
    rig.cni("ADD", conf, pod=pod, container_id="live", env=cni_args(uid)).ok()
    # A status whose DEL never came (e.g. the node rebooted), its NIC (B) home again.
    claims.write_status(
        str(dra),
        claims.DeviceStatus(
            claim_uid=gone.uid,
            claim_namespace="default",
            claim_name="gone",
            driver=claims.DEFAULT_DRIVER,
            pool="node-a",
            device=claims.device_name(B),
            pod_uid=gone.pods[0].uid,
            container_id="dead",
            if_name="net1",
            interface_name="net1",
            ips=(),
            hardware_address="02:00:00:00:00:02",
        ),
    )
    assert len(status_files(dra)) == 2
    # GC with no valid attachment at all: only the status whose NIC is home goes; the live
    # pod's NIC is not home, so its status stays whatever GC is told.
    rig.cni("GC", dict(conf, **{"cni.dev/valid-attachments": []}), netns="").ok()
    assert [s.container_id for s in statuses(dra)] == ["live"]
    rig.cni("DEL", conf, pod=pod, container_id="live", env=cni_args(uid)).ok()
    assert home(rig, nics, A, B, C) and statuses(dra) == []


def test_runtime_kills_a_chained_add_by_claim_and_dels_at_once(rig, dra, nics, figures):
    """The abandoned-call guarantee for NICs by claim (tests/cni/test_cni_abandoned.py has it
    for deviceID): the runtime SIGKILLs the plugin at 12 points of a chained ADD taking two
    claimed NICs and DELs at once; after each, both NICs are home as they were, no lease, no
    status file, nothing in the pod."""
    import os
    import signal
    import time

    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second")))
    pod = rig.pod()
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    conf = rig.conf("1.0.0", prevResult=prev)
    env = cni_args(uid)
    t0 = time.monotonic()
    rig.cni("ADD", conf, pod=pod, ifname="eth0", env=env).ok()
    length = time.monotonic() - t0
    rig.cni("DEL", conf, pod=pod, ifname="eth0", env=env).ok()
    kills = 0
    for i in range(12):
        proc = rig.cni("ADD", conf, pod=pod, ifname="eth0", env=env, background=True)
        time.sleep(length * i / 12)
        kills += proc.poll() is None
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate(timeout=60)
        if rig.cni("DEL", conf, pod=pod, ifname="eth0", env=env).rc != 0:
            rig.cni("DEL", conf, pod=pod, ifname="eth0", env=env).ok()  # as containerd retries
        assert home(rig, nics, A, B), f"kill {i}: a NIC is not home as it was"
        assert rig.leases() == [] and status_files(dra) == [], f"kill {i}: something leaked"
        assert not rig.has_link("net1", pod) and not rig.has_link("net2", pod)
        figures.add(faults_survived=1)
    assert kills >= 6, f"only {kills} of 12 ADDs were still running when killed"
