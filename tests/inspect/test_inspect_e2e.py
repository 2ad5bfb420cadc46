"""virtdp-inspect against the other tools as shipped: virtdp-serve advertising to the test
kubelet, the kubelet allocating, ehost-device plumbing the NIC into a pod with real host-local
IPAM, and the pod-resources API reporting it. Then inspect must see exactly that."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from fakesysfs import FakeSysfs
from inspectlab import inspect_json, pci_domain
from netlab import ip, namespaces, tag, veth
from testkubelet import TestKubelet
from testpodresources import Container, Pod, PodResourcesServer
from toolrun import node_policy, tool_command

RES = "kernel.org/virt"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _cni(node, command: str, conf: dict, pod, ifname: str = "net1", policy=None):
    env = {
        **(policy or {}),
        "PATH": PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "ctr-" + tag(6),
        "CNI_NETNS": pod.path,
        "CNI_IFNAME": ifname,
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
    }
    argv = tool_command("ehost-device")
    if not argv[0].endswith(".pex") and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        ["ip", "netns", "exec", node.name, *argv],
        env=env,
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to 107 bytes: keep the tree short.
    d = Path(tempfile.mkdtemp(prefix="vdi-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_serve_allocate_plumb_then_inspect_sees_it_all(short_dir):
    dom = pci_domain()
    nics = {f"{dom}:00:0a.0": ("ens5", 0), f"{dom}:00:0b.0": ("ens6", 1)}
    sysfs = FakeSysfs(short_dir / "sys")
    plugin_dir = short_dir / "dp"
    plugin_dir.mkdir()
    pr_sock = str(short_dir / "pr.sock")
    with (
        namespaces("vin", "viw", "vip") as (node, wire, pod),
        TestKubelet(str(plugin_dir)) as kubelet,
    ):
        for pci, (name, numa) in nics.items():
            veth(node, name, wire, "w" + name)
            mac = json.loads(ip("-j", "link", "show", name, ns=node.name).stdout)[0]["address"]
            sysfs.add_virtio_nic(pci, name, numa_node=numa, mac=mac)
        serve = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.name,
                *tool_command("virtdp-serve"),
                "--device-plugin-dir",
                str(plugin_dir),
                "--devinfo-dir",
                str(short_dir / "devinfo"),
                "--sysfs-root",
                str(sysfs.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            kubelet.wait_registered(RES, timeout=20)
            kubelet.wait_health(RES, {p: "Healthy" for p in nics}, timeout=10)
            (chosen,), _ = kubelet.allocate(RES, 1, owner="default/web/app")
            host_name, numa = nics[chosen]

            policy = node_policy(short_dir / "policy.yaml", str(sysfs.root))
            conf = {
                "cniVersion": "1.0.0",
                "name": "vnet",
                "type": "ehost-device",
                "deviceID": chosen,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(short_dir / "ipam"),
                    "ranges": [[{"subnet": "198.51.100.0/24"}]],
                },
            }
            add = _cni(node, "ADD", conf, pod, policy=policy)
            assert add.returncode == 0, add.stdout + add.stderr
            address = json.loads(add.stdout)["ips"][0]["address"]
            sysfs.move_netdev_away(chosen)  # what the node's sysfs now shows

            pods = [Pod("web", "default", "uid-web", [Container("app", {RES: {numa: [chosen]}})])]
            allocatable = {RES: {n: [p] for p, (_, n) in nics.items()}}
            with PodResourcesServer(pr_sock, pods, allocatable):
                devs, proc = inspect_json(
                    "devices",
                    "--device-plugin-dir",
                    str(plugin_dir),
                    "--pod-resources-socket",
                    pr_sock,
                )
                assert proc.returncode == 0, proc.stderr
                [plugin] = devs["plugins"]
                assert plugin["status"] == "ok" and plugin["resource"] == RES
                assert {d["id"]: (d["health"], d["numa_nodes"]) for d in plugin["devices"]} == {
                    p: ("Healthy", [n]) for p, (_, n) in nics.items()
                }

                alloc, proc = inspect_json(
                    "allocations",
                    "--pod-resources-socket",
                    pr_sock,
                    "--sysfs-root",
                    str(sysfs.root),
                    "--netns",
                    node.path,
                )
                assert proc.returncode == 0, proc.stderr
                [row] = alloc["allocations"]
                assert (row["namespace"], row["pod"], row["container"]) == ("default", "web", "app")
                assert (row["device_id"], row["numa_node"], row["location"]) == (
                    chosen,
                    numa,
                    "pod",
                )
                assert (row["netns"], row["ifname"], row["host_ifname"]) == (
                    pod.name,
                    "net1",
                    host_name,
                )

            found, proc = inspect_json("netns")
            [nic] = [r for r in found["nics"] if r["netns"] == pod.name]
            assert (nic["ifname"], nic["host_ifname"], nic["pci_address"]) == (
                "net1",
                host_name,
                chosen,
            )
            assert address in nic["addresses"]

            # DEL gives the NIC back: no longer found in any pod namespace, back on the host.
            dele = _cni(node, "DEL", conf, pod, policy=policy)
            assert dele.returncode == 0, dele.stdout + dele.stderr
            sysfs.add_netdev(chosen, host_name)
            found, _ = inspect_json("netns")
            assert not [r for r in found["nics"] if r["pci_address"] == chosen]
            with PodResourcesServer(pr_sock, pods, allocatable):
                alloc, _ = inspect_json(
                    "allocations",
                    "--pod-resources-socket",
                    pr_sock,
                    "--sysfs-root",
                    str(sysfs.root),
                    "--netns",
                    node.path,
                )
            [row] = alloc["allocations"]
            assert (row["location"], row["ifname"]) == ("host", host_name)
        finally:
            serve.terminate()
            try:
                serve.wait(15)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
