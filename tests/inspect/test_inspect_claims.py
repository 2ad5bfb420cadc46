"""`virtdp-inspect claims`: the DRA claims prepared on the node (claims.json, written through
virtcore.claims as virtdp-serve writes it), their pods, where each claimed NIC is now (real
namespaces, a NIC plumbed and marked the way ehost-device leaves it), the recorded network
status, and with --kubeconfig what the test API server says of each claim."""

from __future__ import annotations

import dataclasses

import pytest
from claimlab import DRIVER, NODE, claim, device, new_uid, write
from inspectlab import host_nic, inspect, inspect_json, one_line_error, pci_domain
from netlab import ip, namespaces
from testapiserver import TestApiServer

from virtcore import claims
from virtcore.alias import Mark


@pytest.fixture
def node(tmp_path, fake_sysfs):
    """A (ens5) on the host, claimed by pod-a but not plumbed yet; B plumbed by claim into
    pod-b as net1, with its network status; C claimed but not on this node."""
    dom = pci_domain()
    a, b, c = (f"{dom}:00:{n}.0" for n in ("0a", "0b", "0c"))
    dra = tmp_path / "dra"
    with namespaces("vch", "vcp", "vcx") as (host, pod, peers):
        for pci, name in ((a, "ens5"), (b, "ens6")):
            host_nic(host, peers, name)
            fake_sysfs.add_virtio_nic(pci, name, numa_node=0)
        uid_a, uid_b, uid_c = new_uid(), new_uid(), new_uid()
        ca = claim("nic-a", uid_a, device(a), pod_name="pod-a")
        cb = claim("nic-b", uid_b, device(b, interface_name="fast0"), namespace="prod")
        cc = claim("nic-c", uid_c, device(c, "far"), pod_name="pod-c")
        write(dra, ca, cb, cc)
        mark = Mark("ens6", b, pod=uid_b, claim=cb.uid, attachment="eth0")
        ip("link", "set", "ens6", "netns", pod.name, ns=host.name)
        ip("link", "set", "ens6", "name", "fast0", ns=pod.name)
        ip("link", "set", "fast0", "alias", mark.encode(), ns=pod.name)
        ip("addr", "add", "198.51.100.7/24", "dev", "fast0", ns=pod.name)
        fake_sysfs.move_netdev_away(b)
        status = claims.DeviceStatus(
            claim_uid=cb.uid,
            claim_namespace="prod",
            claim_name="nic-b",
            driver=DRIVER,
            pool=NODE,
            device=claims.device_name(b),
            pod_uid=uid_b,
            container_id="sandbox-b",
            if_name="eth0",
            interface_name="fast0",
            ips=("198.51.100.7/24",),
            hardware_address="02:00:00:00:00:0b",
        )
        claims.write_status(str(dra), status)
        yield {
            "pci": (a, b, c),
            "claims": (ca, cb, cc),
            "dra": dra,
            "pod": pod,
            "args": ["--dra-state-dir", str(dra), "--sysfs-root", str(fake_sysfs)]
            + ["--netns", host.path],
        }


def _rows(doc):
    return {r["claim"]: r for r in doc["claims"]}


def test_prepared_claims_their_pods_and_where_each_nic_is(node):
    a, b, c = node["pci"]
    ca, cb, _ = node["claims"]
    doc, proc = inspect_json("claims", *node["args"])
    assert proc.returncode == 0, proc.stderr
    assert "3 prepared claims, 1 network status files" in proc.stderr
    assert doc["api"] is False and doc["dra_state_dir"] == str(node["dra"])
    rows = _rows(doc)
    assert list(rows) == ["nic-a", "nic-c", "nic-b"]  # by namespace, then name

    ra = rows["nic-a"]
    assert (ra["namespace"], ra["claim_uid"], ra["pods"]) == ("default", ca.uid, ["default/pod-a"])
    assert (ra["device"], ra["pci_address"], ra["location"], ra["ifname"]) == (
        claims.device_name(a),
        a,
        "host",
        "ens5",
    )
    assert ra["status"] is None and ra["api"] is None

    rb = rows["nic-b"]
    assert rb["pod_uids"] == [cb.pods[0].uid] and rb["interface_name"] == "fast0"
    assert (rb["location"], rb["netns"], rb["ifname"], rb["host_ifname"]) == (
        "pod",
        node["pod"].name,
        "fast0",
        "ens6",
    )
    assert rb["status"] == {
        "pod_uid": cb.pods[0].uid,
        "container_id": "sandbox-b",
        "if_name": "eth0",
        "interface_name": "fast0",
        "ips": ["198.51.100.7/24"],
        "hardware_address": "02:00:00:00:00:0b",
    }
    rc = rows["nic-c"]
    assert (rc["request"], rc["location"]) == ("far", "absent")

    # `netns` shows whose the NIC is, from its mark.
    scan, proc = inspect_json("netns")
    assert proc.returncode == 0, proc.stderr
    [marked] = [n for n in scan["nics"] if n["pci_address"] == b]
    assert (marked["claim_uid"], marked["pod_uid"], marked["attachment"]) == (
        cb.uid,
        cb.pods[0].uid,
        "eth0",
    )

    table = inspect("claims", *node["args"])
    assert table.returncode == 0, table.stderr
    [line] = [x for x in table.stdout.splitlines() if "prod/nic-b" in x]
    assert f"{node['pod'].name}: fast0 (host ens6)" in line and "198.51.100.7/24" in line


def test_with_the_api_the_allocation_and_device_status_of_each_claim(node, tmp_path):
    a, b, c = node["pci"]
    ca, cb, cc = node["claims"]
    with TestApiServer() as api:
        for prepared in (ca, cb):
            made = api.create(
                "resourceclaims",
                {
                    "metadata": {"name": prepared.name, "namespace": prepared.namespace},
                    "spec": {"devices": {"requests": [{"name": "nic"}]}},
                },
            )
            # Our record holds the UID the API gave the claim (prepare checks it).
            pod = prepared.pods[0]
            made["status"] = {
                "allocation": {
                    "devices": {
                        "results": [
                            {
                                "request": prepared.devices[0].request,
                                "driver": DRIVER,
                                "pool": NODE,
                                "device": prepared.devices[0].device,
                            }
                        ]
                    }
                },
                "reservedFor": [{"resource": "pods", "name": pod.name, "uid": pod.uid}],
            }
            if prepared is cb:
                made["status"]["devices"] = [
                    {
                        "driver": DRIVER,
                        "pool": NODE,
                        "device": prepared.devices[0].device,
                        "networkData": {
                            "interfaceName": "fast0",
                            "ips": ["198.51.100.7/24"],
                            "hardwareAddress": "02:00:00:00:00:0b",
                        },
                    }
                ]
            api.update("resourceclaims", made, subresource="status")
            if prepared is cb:  # prepared after the API made it: the record holds its UID
                uid = made["metadata"]["uid"]
                old = claims.load_statuses(str(node["dra"]))[0]
                claims.remove_status(str(node["dra"]), cb.uid, old.device)
                claims.write_status(str(node["dra"]), dataclasses.replace(old, claim_uid=uid))
                cb = dataclasses.replace(cb, uid=uid)
                write(node["dra"], ca, cb, cc)
        kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
        doc, proc = inspect_json("claims", *node["args"], "--kubeconfig", kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert doc["api"] is True
    rows = _rows(doc)
    ra, rb, rc = rows["nic-a"]["api"], rows["nic-b"]["api"], rows["nic-c"]["api"]
    assert ra["allocated"] is True and ra["network_data"] is None
    assert ra["reserved_for"] == [f"pods/pod-a ({ca.pods[0].uid})"]
    # nic-a in the API is another claim of the same name (a UID the record does not hold).
    assert "has UID" in ra["note"] and ca.uid in ra["note"]
    assert rb["note"] is None and rb["allocated"] is True
    assert rb["network_data"] == {
        "interfaceName": "fast0",
        "ips": ["198.51.100.7/24"],
        "hardwareAddress": "02:00:00:00:00:0b",
    }
    assert rc == {"error": "not found (deleted since it was prepared?)"}


def test_orphan_status_files_are_reported(node):
    claims.write_status(
        str(node["dra"]),
        claims.DeviceStatus(
            claim_uid=new_uid(),
            claim_namespace="old",
            claim_name="gone",
            driver=DRIVER,
            pool=NODE,
            device="pci-0000-00-1f-0",
            pod_uid=new_uid(),
            container_id="x",
            if_name="net1",
            interface_name="net1",
            ips=(),
            hardware_address="02:00:00:00:00:01",
        ),
    )
    (node["dra"] / "status" / "junk_pci-0000-00-1e-0.json").write_text("{")
    doc, proc = inspect_json("claims", *node["args"])
    assert proc.returncode == 0, proc.stderr
    assert any("old/gone" in p and "names no prepared claim" in p for p in doc["problems"])
    assert any("junk_pci-0000-00-1e-0.json" in p for p in doc["problems"])


def test_unusable_record_is_one_line_exit_1(node):
    (node["dra"] / "claims.json").write_text('{"version": 1, "claims": "x"}')
    proc = inspect("claims", *node["args"])
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_line_error(proc)
    assert str(node["dra"] / "claims.json") in line


def test_no_record_is_no_claims(tmp_path, fake_sysfs):
    doc, proc = inspect_json(
        "claims", "--dra-state-dir", str(tmp_path / "nothing"), "--sysfs-root", str(fake_sysfs)
    )
    assert proc.returncode == 0, proc.stderr
    assert doc["claims"] == []


def test_unreachable_api_is_a_per_claim_error(node, tmp_path):
    with TestApiServer() as api:
        kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
        api.down()
        doc, proc = inspect_json(
            "claims", *node["args"], "--kubeconfig", kubeconfig, "--timeout", "1"
        )
    assert proc.returncode == 0, proc.stderr
    for row in doc["claims"]:
        assert row["api"]["error"].startswith("API server unreachable"), row["api"]
