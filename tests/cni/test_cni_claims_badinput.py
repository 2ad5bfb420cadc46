"""Bad input to ehost-device by claim: a clear CNI error naming what was wrong, and nothing
touched or lost (every NIC home as it was, no lease, no status file). One-shot cases against
the corpus node are in tests/corpus/cni/claims-*.json."""

from __future__ import annotations

import pytest
from claimlab import claim, cni_args, device, new_uid, status_files, write
from claimrig import A, B, C, cluster, cluster_leases, home, mark


def untouched(rig, nics, dra, pod) -> None:
    assert home(rig, nics, A, B, C)
    assert rig.leases() == [] and cluster_leases(rig) == [] and status_files(dra) == []
    assert not rig.has_link("net1", pod) and not rig.has_link("net2", pod)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{", "not JSON"),
        ('{"version": 2, "driver": "virt.kernel.org", "node": "n", "claims": []}', "version"),
        ('{"version": 1, "driver": "virt.kernel.org", "node": "n", "claims": {}}', "claims"),
        (
            '{"version": 1, "driver": "d", "node": "n", "claims": [{"uid": "u1", "namespace": '
            '"ns", "name": "c", "pods": [], "devices": [{"request": "r", "pool": "p", '
            '"device": "pci-0000-00-05-0", "pciAddress": "eth0", "interfaceName": null}]}]}',
            "pciAddress",
        ),
    ],
)
def test_unusable_claim_record_is_an_error_naming_the_file(rig, dra, nics, content, fragment):
    (dra / "claims.json").write_text(content)
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0"), pod=pod, env=cni_args(new_uid())).error(111)
    assert str(dra / "claims.json") in err["details"] and fragment in err["details"], err
    # Chained, too: the pod may hold claims, so passing it through would be a guess.
    net = cluster(rig)
    with pytest.raises(AssertionError):
        net.add(pod=pod, env=cni_args(new_uid()))
    assert net.runs[-1][2].out["code"] == 111
    net.delete(pod=pod, env=cni_args(new_uid()))  # the runtime's DEL after the failed ADD
    untouched(rig, nics, dra, pod)


def test_claimed_nic_absent_from_the_node(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A)), claim("c2", uid, device("0000:00:1f.0")))
    pod = rig.pod()
    net = cluster(rig)
    with pytest.raises(AssertionError):
        net.add(pod=pod, env=cni_args(uid))
    err = net.runs[-1][2].out
    assert err["code"] == 100, err
    assert "claim default/c2" in err["msg"] and "0000:00:1f.0" in err["msg"], err
    net.delete(pod=pod, env=cni_args(uid))
    untouched(rig, nics, dra, pod)


def test_failure_on_the_second_nic_undoes_the_first(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second")))
    pod = rig.pod()
    # One address in the range: the second NIC's IPAM ADD fails after the first is plumbed.
    one = rig.host_local(
        ranges=[
            [
                {
                    "subnet": "198.51.100.0/24",
                    "rangeStart": "198.51.100.9",
                    "rangeEnd": "198.51.100.9",
                }
            ]
        ]
    )
    net = cluster(rig)
    net.conflist["plugins"][1]["ipam"] = one
    with pytest.raises(AssertionError):
        net.add(pod=pod, env=cni_args(uid))
    err = net.runs[-1][2].out
    assert "no IP addresses available" in err["msg"], err  # host-local's own error
    assert home(rig, nics, A, B) and rig.leases() == [] and status_files(dra) == []
    net.delete(pod=pod, env=cni_args(uid))
    untouched(rig, nics, dra, pod)


def test_only_the_nics_of_our_drivers_claims_are_taken(rig, dra, nics):
    """A pod with a claim of ours (A) and one of another DRA driver (B, e.g. dranet's): our
    record (written by virtdp-serve for its own driver only) lists A; B is not ours to take,
    even though it is an eligible virtio NIC and another driver's record names it."""
    uid = new_uid()
    write(dra, claim("ours", uid, device(A)))
    theirs = rig.tmp / "other-driver"
    (theirs).mkdir()
    (theirs / "claims.json").write_text(
        '{"version": 1, "driver": "dra.net", "node": "node-a", "claims": [{"uid": "u-theirs",'
        f' "namespace": "default", "name": "theirs", "pods": [{{"uid": "{uid}", "namespace": '
        '"default", "name": "p"}], "devices": [{"request": "nic", "pool": "node-a", "device": '
        f'"pci-0000-00-06-0", "pciAddress": "{B}", "interfaceName": null}}]}}]}}'
    )
    pod = rig.pod()
    net = cluster(rig)
    out = net.add(pod=pod, env=cni_args(uid))
    assert [i["name"] for i in out["interfaces"][-1:]] == ["net1"]
    assert mark(rig, "net1", pod).pci_address == A
    assert home(rig, nics, B, C) and rig.has_link("net1", pod) and not rig.has_link("net2", pod)
    net.delete(pod=pod, env=cni_args(uid))
    assert home(rig, nics, A, B, C) and status_files(dra) == []


def test_missing_pod_uid_fails_a_nad_and_passes_a_chain_through(rig, dra, nics):
    write(dra, claim("c1", new_uid(), device(A)))
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0"), pod=pod, env=cni_args(None)).error(7)
    assert "no NIC given" in err["msg"] and "K8S_POD_UID" in err["details"], err
    net = cluster(rig)
    out = net.add(pod=pod, env=cni_args(None))
    assert out == net.runs[0][2].out
    net.delete(pod=pod, env=cni_args(None))
    untouched(rig, nics, dra, pod)


def test_pod_uid_that_is_no_uid(rig, dra, nics):
    write(dra, claim("c1", new_uid(), device(A)))
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0"), pod=pod, env=cni_args("../../etc")).error(4)
    assert "K8S_POD_UID='../../etc'" in err["msg"], err
    rig.cni("DEL", rig.conf("1.0.0"), pod=pod, env=cni_args("../../etc")).ok()
    untouched(rig, nics, dra, pod)


def test_pod_without_a_claim_through_a_nad(rig, dra, nics):
    write(dra, claim("c1", new_uid(), device(A)))
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0"), pod=pod, env=cni_args(new_uid())).error(112)
    assert str(dra / "claims.json") in err["details"], err
    untouched(rig, nics, dra, pod)


def test_two_claims_naming_the_same_interface(rig, dra, nics):
    uid = new_uid()
    write(
        dra,
        claim("c1", uid, device(A, interface_name="data0")),
        claim("c2", uid, device(B, interface_name="data0")),
    )
    pod = rig.pod()
    net = cluster(rig)
    with pytest.raises(AssertionError):
        net.add(pod=pod, env=cni_args(uid))
    err = net.runs[-1][2].out
    assert err["code"] == 111 and "data0" in err["msg"], err
    net.delete(pod=pod, env=cni_args(uid))
    untouched(rig, nics, dra, pod)


def test_claim_naming_an_interface_the_pod_has(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second", interface_name="eth0")))
    pod = rig.pod()
    net = cluster(rig)
    with pytest.raises(AssertionError):
        net.add(pod=pod, env=cni_args(uid))
    err = net.runs[-1][2].out
    assert err["code"] == 103 and "eth0" in err["msg"], err
    net.delete(pod=pod, env=cni_args(uid))
    untouched(rig, nics, dra, pod)


def test_status_that_cannot_be_written_undoes_the_add(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A)))
    (dra / "status").write_text("not a directory\n")
    pod = rig.pod()
    err = rig.cni("ADD", rig.conf("1.0.0"), pod=pod, env=cni_args(uid)).error(5)
    assert "network status" in err["msg"] and str(dra / "status") in err["details"], err
    assert home(rig, nics, A) and rig.leases() == [] and not rig.has_link("net1", pod)
    rig.cni("DEL", rig.conf("1.0.0"), pod=pod, env=cni_args(uid)).ok()


def test_claim_shared_by_two_pods_gives_the_nic_to_the_first_only(rig, dra, nics):
    first, second = new_uid(), new_uid()
    write(dra, claim("shared", first, device(A), more_pods=[second]))
    pods = rig.pod(), rig.pod()
    conf = rig.conf("1.0.0")
    rig.cni("ADD", conf, pod=pods[0], container_id="one", env=cni_args(first)).ok()
    err = rig.cni("ADD", conf, pod=pods[1], container_id="two", env=cni_args(second)).error(102)
    assert "claim default/shared" in err["msg"], err
    rig.cni("DEL", conf, pod=pods[1], container_id="two", env=cni_args(second)).ok()
    assert rig.has_link("net1", pods[0]) and len(status_files(dra)) == 1
    rig.cni("DEL", conf, pod=pods[0], container_id="one", env=cni_args(first)).ok()
    untouched(rig, nics, dra, pods[0])


def test_a_mac_for_several_claimed_nics(rig, dra, nics):
    uid = new_uid()
    write(dra, claim("c1", uid, device(A), device(B, "second")))
    pod = rig.pod()
    net = cluster(rig, mac="02:00:00:00:00:09")
    with pytest.raises(AssertionError):
        net.add(pod=pod, env=cni_args(uid))
    err = net.runs[-1][2].out
    assert err["code"] == 7 and "mac" in err["msg"], err
    net.delete(pod=pod, env=cni_args(uid))
    untouched(rig, nics, dra, pod)


def test_draStateDir_in_a_network_config_is_refused(rig, dra, nics):  # noqa: N802
    pod = rig.pod()
    conf = rig.conf("1.0.0", draStateDir=str(rig.tmp))
    err = rig.cni("ADD", conf, pod=pod, env=cni_args(new_uid())).error(7)
    assert "draStateDir is a node setting" in err["msg"], err
    untouched(rig, nics, dra, pod)
