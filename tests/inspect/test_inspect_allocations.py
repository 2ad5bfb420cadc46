"""`virtdp-inspect allocations`: the kubelet's allocations (pod-resources API, else its
checkpoint) joined with where each NIC is now, on real namespaces with NICs plumbed the way
ehost-device leaves them and a fake sysfs for the PCI side."""

from __future__ import annotations

import pytest
from inspectlab import (
    RawSocketServer,
    host_nic,
    inspect,
    inspect_json,
    one_line_error,
    pci_domain,
    plumb,
    refusing_socket,
)
from netlab import ip, namespaces
from testpodresources import Container, Pod, PodResourcesServer, checkpoint_json

RES = "kernel.org/virt"


@pytest.fixture
def node(tmp_path, fake_sysfs):
    """Four NICs: A on the host, B plumbed into a pod as net1, C whose netdev is nowhere, and
    D allocated but not on this node at all."""
    dom = pci_domain()
    a, b, c, d = (f"{dom}:00:{n}.0" for n in ("0a", "0b", "0c", "0d"))
    with namespaces("vih", "vip", "vix") as (host, pod, peers):
        for pci, name, numa in ((a, "ens5", 0), (b, "ens6", 1), (c, "ens7", -1)):
            host_nic(host, peers, name)
            fake_sysfs.add_virtio_nic(pci, name, numa_node=numa)
        plumb(host, pod, "ens6", b, "net1", addresses=["198.51.100.7/24"])
        fake_sysfs.move_netdev_away(b)
        # C: moved away unmarked (e.g. another tool took it), so neither here nor findable.
        ip("link", "set", "ens7", "netns", peers.name, ns=host.name)
        fake_sysfs.move_netdev_away(c)
        pods = [
            Pod("web", "default", "uid-web", [Container("app", {RES: {1: [b]}})]),
            Pod(
                "db",
                "prod",
                "uid-db",
                [
                    Container("main", {RES: {0: [a], -1: [c]}}),
                    Container("side", {RES: {-1: [d]}, "vendor.com/gpu": {0: ["GPU-1"]}}),
                ],
            ),
        ]
        yield {
            "pci": (a, b, c, d),
            "host": host,
            "pod": pod,
            "pods": pods,
            "sock": str(tmp_path / "pod-resources.sock"),
            "ck": str(tmp_path / "kubelet_internal_checkpoint"),
            "args": ["--sysfs-root", str(fake_sysfs), "--netns", host.path],
        }


def _run(node, *extra):
    return inspect_json(
        "allocations",
        "--pod-resources-socket",
        node["sock"],
        "--checkpoint",
        node["ck"],
        *node["args"],
        *extra,
    )


def _by_device(doc):
    return {r["device_id"]: r for r in doc["allocations"]}


def test_from_the_pod_resources_api_with_every_nic_placed(node):
    a, b, c, d = node["pci"]
    with PodResourcesServer(node["sock"], node["pods"]) as server:
        doc, proc = _run(node)
    assert proc.returncode == 0, proc.stderr
    assert server.calls == ["List"]
    assert doc["source"] == "pod-resources" and doc["source_path"] == node["sock"]
    assert doc["fallback_reason"] is None
    assert f"source: pod-resources API at {node['sock']}" in proc.stderr
    rows = _by_device(doc)
    assert set(rows) == {a, b, c, d, "GPU-1"}

    web = rows[b]
    assert (web["namespace"], web["pod"], web["container"], web["resource"]) == (
        "default",
        "web",
        "app",
        RES,
    )
    assert web["location"] == "pod" and web["netns"] == node["pod"].name
    assert web["netns_path"] == node["pod"].path
    assert (web["ifname"], web["host_ifname"]) == ("net1", "ens6")
    assert (web["numa_node"], web["kubelet_numa_node"], web["pci_address"]) == (1, 1, b)

    host = rows[a]
    assert (host["pod"], host["container"], host["location"]) == ("db", "main", "host")
    assert (host["ifname"], host["netns"], host["numa_node"]) == ("ens5", "host", 0)

    missing = rows[c]
    assert missing["location"] == "missing" and missing["ifname"] is None
    assert missing["numa_node"] is None and missing["kubelet_numa_node"] is None
    assert "neither in the host namespace nor found" in missing["note"]

    assert rows[d]["location"] == "absent" and rows[d]["container"] == "side"
    assert rows["GPU-1"]["location"] == "absent" and rows["GPU-1"]["pci_address"] is None


def test_resource_filter_and_table(node):
    a, b, c, d = node["pci"]
    with PodResourcesServer(node["sock"], node["pods"]):
        doc, proc = _run(node, "--resource", RES)
        table = inspect("allocations", "--pod-resources-socket", node["sock"], *node["args"])
    assert {r["resource"] for r in doc["allocations"]} == {RES}
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    [web] = [x for x in lines if b in x]
    assert "default/web" in web and f"{node['pod'].name}: net1 (host ens6)" in web
    [host] = [x for x in lines if a in x]
    assert "prod/db" in host and "host: ens5" in host
    assert "missing" in [x for x in lines if c in x][0]


def test_dra_devices_from_the_pod_resources_api_are_placed_like_nics(node):
    """A container's DRA claims: one row per device, resource = the driver, the claim named;
    virtdp's device names (pci-...) are placed like NICs, another driver's are not NICs."""
    from testpodresources import Claim, DraDevice

    from virtcore import claims

    a, b, c, d = node["pci"]
    nic = DraDevice("virt.kernel.org", "node-a", claims.device_name(b), ["virt.kernel.org/n=b"])
    gpu = DraDevice("gpu.example.com", "node-a", "gpu-0")
    pods = [
        Pod(
            "dra",
            "team",
            "uid-dra",
            [Container("app", {RES: {0: [a]}}, claims=[Claim("nic", [nic]), Claim("gpu", [gpu])])],
        )
    ]
    with PodResourcesServer(node["sock"], pods):
        doc, proc = _run(node)
        table = inspect("allocations", "--pod-resources-socket", node["sock"], *node["args"])
    assert proc.returncode == 0, proc.stderr
    rows = _by_device(doc)
    assert set(rows) == {a, claims.device_name(b), "gpu-0"}
    assert rows[a]["claim"] is None and rows[a]["resource"] == RES
    dra = rows[claims.device_name(b)]
    assert (dra["resource"], dra["claim"], dra["pool"], dra["container"]) == (
        "virt.kernel.org",
        "team/nic",
        "node-a",
        "app",
    )
    assert (dra["pci_address"], dra["location"], dra["ifname"]) == (b, "pod", "net1")
    other = rows["gpu-0"]
    assert (other["claim"], other["location"], other["pci_address"]) == ("team/gpu", "absent", None)
    assert "not named from a PCI address" in other["note"]
    assert table.returncode == 0, table.stderr
    [line] = [x for x in table.stdout.splitlines() if claims.device_name(b) in x]
    assert "team/nic" in line and f"{node['pod'].name}: net1" in line


@pytest.mark.parametrize("flat", [False, True])
def test_falls_back_to_the_checkpoint_when_the_socket_refuses(node, flat):
    a, b, c, d = node["pci"]
    refusing_socket(node["sock"])
    with open(node["ck"], "w") as f:
        f.write(checkpoint_json(node["pods"], {RES: {0: [a, b, c]}}, flat=flat))
    doc, proc = _run(node)
    assert proc.returncode == 0, proc.stderr
    assert doc["source"] == "checkpoint" and doc["source_path"] == node["ck"]
    assert "connection refused" in doc["fallback_reason"]
    assert f"source: checkpoint {node['ck']}" in proc.stderr
    rows = _by_device(doc)
    web = rows[b]
    # The checkpoint knows pods by UID only.
    assert (web["pod"], web["namespace"], web["pod_uid"], web["container"]) == (
        None,
        None,
        "uid-web",
        "app",
    )
    assert (web["location"], web["ifname"], web["netns"]) == ("pod", "net1", node["pod"].name)
    assert web["kubelet_numa_node"] == (None if flat else 1)
    assert rows[a]["location"] == "host" and rows[c]["location"] == "missing"


def test_falls_back_when_the_socket_hangs_and_is_bounded_by_the_timeout(node):
    with open(node["ck"], "w") as f:
        f.write(checkpoint_json(node["pods"], {}))
    with RawSocketServer(node["sock"], "hang"):
        doc, proc = _run(node, "--timeout", "0.5")
    assert proc.returncode == 0
    assert doc["source"] == "checkpoint"
    assert "sent nothing within 0.5s" in doc["fallback_reason"]


def test_no_source_at_all_is_one_line_exit_1(node, tmp_path):
    proc = inspect(
        "allocations",
        "--pod-resources-socket",
        str(tmp_path / "none.sock"),
        "--checkpoint",
        str(tmp_path / "none"),
        *node["args"],
    )
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_line_error(proc)
    assert "none.sock: no such socket" in line and "checkpoint fallback failed" in line
    assert "none: no such file" in line

    with open(node["ck"], "w") as f:
        f.write('{"Data": {"PodDeviceEntries": [{"PodUID": 1}]}}')
    proc = inspect(
        "allocations",
        "--pod-resources-socket",
        str(tmp_path / "none.sock"),
        "--checkpoint",
        node["ck"],
        *node["args"],
    )
    assert proc.returncode == 1
    assert "Data.PodDeviceEntries[0].PodUID: is a number, expected a string" in one_line_error(proc)
