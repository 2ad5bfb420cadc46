"""`virtdp-inspect devices`: every plugin socket in the device-plugins directory dialled the way
the kubelet dials it, next to sockets that hang, speak HTTP/1, refuse, and plain files."""

from __future__ import annotations

import os
import time

from inspectlab import (
    DevicePluginServer,
    RawSocketServer,
    device,
    inspect,
    inspect_json,
    refusing_socket,
)
from testpodresources import Container, Pod, PodResourcesServer, checkpoint_json

RES = "kernel.org/virt"


def _dir(tmp_path):
    d = tmp_path / "device-plugins"
    d.mkdir()
    return d


def test_a_good_plugin_and_every_bad_socket(tmp_path):
    d = _dir(tmp_path)
    (d / "kubelet.sock").write_text("")  # the kubelet's own: never dialled
    (d / "notes.txt").write_text("x")
    refusing_socket(str(d / "dead.sock"))
    ids = ["0000:00:0a.0", "0000:00:0b.0"]
    devs = [device(ids[0], numa=0), device(ids[1], "Unhealthy")]
    pr = str(tmp_path / "pod-resources.sock")
    with (
        DevicePluginServer(str(d / "virtdp.sock"), devs, pre_start=True),
        RawSocketServer(str(d / "hung.sock"), "hang"),
        RawSocketServer(str(d / "web.sock"), "http1"),
        PodResourcesServer(pr, [], {RES: {0: ids[:1], -1: ids[1:]}}),
    ):
        started = time.monotonic()
        doc, proc = inspect_json(
            "devices",
            "--device-plugin-dir",
            str(d),
            "--pod-resources-socket",
            pr,
            "--timeout",
            "1",
        )
        elapsed = time.monotonic() - started
    assert proc.returncode == 1  # some sockets did not answer as plugins
    # Dialled side by side: the hung socket costs one timeout, not one per socket.
    assert elapsed < 6
    assert doc["device_plugin_dir"] == str(d)
    plugins = {os.path.basename(p["socket"]): p for p in doc["plugins"]}
    assert set(plugins) == {"dead.sock", "hung.sock", "notes.txt", "virtdp.sock", "web.sock"}

    good = plugins["virtdp.sock"]
    assert good["status"] == "ok" and good["error"] is None
    assert good["resource"] == RES and good["resource_from"] == "pod-resources"
    assert (good["pre_start_required"], good["get_preferred_allocation_available"]) == (True, True)
    assert good["devices"] == [
        {"id": ids[0], "health": "Healthy", "numa_nodes": [0]},
        {"id": ids[1], "health": "Unhealthy", "numa_nodes": []},
    ]
    assert plugins["notes.txt"]["status"] == "skipped"
    assert "not a socket" in plugins["notes.txt"]["error"]
    assert "connection refused" in plugins["dead.sock"]["error"]
    assert "sent nothing within 1s" in plugins["hung.sock"]["error"]
    assert "not HTTP/2" in plugins["web.sock"]["error"]
    for name in ("dead.sock", "hung.sock", "web.sock"):
        assert plugins[name]["status"] == "error"
        assert plugins[name]["devices"] == []
        # One line each on stderr, naming the socket.
        assert len([x for x in proc.stderr.splitlines() if name in x]) == 1
    assert "Traceback" not in proc.stderr


def test_resource_named_from_the_checkpoint_and_table(tmp_path):
    d = _dir(tmp_path)
    ids = ["0000:00:0c.0"]
    ck = d / "kubelet_internal_checkpoint"  # in the directory: the default place, never dialled
    ck.write_text(
        checkpoint_json(
            [Pod("p", "ns", "u", [Container("c", {RES: {-1: ids}})])],
            {RES: {-1: ids}, "vendor.com/gpu": {-1: ["GPU-1"]}},
        )
    )
    with (
        DevicePluginServer(str(d / "a.sock"), [device(ids[0])]),
        DevicePluginServer(str(d / "gpu.sock"), [device("GPU-1", numa=1)]),
        DevicePluginServer(str(d / "empty.sock"), []),
    ):
        args = [
            "devices",
            "--device-plugin-dir",
            str(d),
            "--pod-resources-socket",
            str(tmp_path / "none.sock"),
        ]
        doc, proc = inspect_json(*args)
        table = inspect(*args)
    assert proc.returncode == 0, proc.stderr
    plugins = {os.path.basename(p["socket"]): p for p in doc["plugins"]}
    assert set(plugins) == {"a.sock", "empty.sock", "gpu.sock"}
    assert (plugins["a.sock"]["resource"], plugins["a.sock"]["resource_from"]) == (
        RES,
        "checkpoint",
    )
    assert plugins["gpu.sock"]["resource"] == "vendor.com/gpu"
    assert plugins["empty.sock"]["status"] == "ok" and plugins["empty.sock"]["resource"] is None
    assert table.returncode == 0
    [row] = [x for x in table.stdout.splitlines() if x.startswith("gpu.sock")]
    assert "vendor.com/gpu" in row and "GPU-1" in row and "Healthy" in row and "1" in row
    assert [x for x in table.stdout.splitlines() if x.startswith("empty.sock")][0].endswith(
        "ok, no devices"
    )


def test_missing_directory_and_empty_directory(tmp_path):
    proc = inspect("devices", "--device-plugin-dir", str(tmp_path / "nope"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "nope: no such directory (is the kubelet running?" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    d = _dir(tmp_path)
    (d / "kubelet_internal_checkpoint").write_text("{}")
    doc, proc = inspect_json("devices", "--device-plugin-dir", str(d))
    assert proc.returncode == 0 and doc["plugins"] == []
    assert "no device plugin sockets" in proc.stderr


def test_nics_that_are_never_advertised_are_listed_with_the_reason(tmp_path, fake_sysfs, netns):
    """The node's virtio NICs that the eligibility rule keeps out of every pool (the rule
    virtdp-serve advertises by and ehost-device's ADD refuses by), each with its reason."""
    from netlab import ip, namespaces, veth

    d = _dir(tmp_path)
    with namespaces("vid") as (peer,):
        for name in ("eth1", "eth2", "eth3"):
            veth(netns, name, peer, "p" + name)
        ip("route", "add", "default", "dev", "eth1", ns=netns.name)
        ip("addr", "add", "198.18.0.2/24", "dev", "eth2", ns=netns.name)
        fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1")
        fake_sysfs.add_virtio_nic("0000:00:0b.0", "eth2")
        fake_sysfs.add_virtio_nic("0000:00:0c.0", "eth3")
        fake_sysfs.add_virtio_nic("0000:00:0d.0", None, driver=None)
        args = ["devices", "--device-plugin-dir", str(d), "--sysfs-root", str(fake_sysfs)]
        args += ["--netns", netns.path]
        doc, proc = inspect_json(*args)
        table = inspect(*args)
    assert proc.returncode == 0, proc.stderr
    assert doc["plugins"] == []
    assert doc["excluded"] == [
        {
            "pci_address": "0000:00:0a.0",
            "ifname": "eth1",
            "reason": "carries the IPv4 default route",
        },
        {
            "pci_address": "0000:00:0b.0",
            "ifname": "eth2",
            "reason": "the node routes through its address 198.18.0.2/24",
        },
        {
            "pci_address": "0000:00:0d.0",
            "ifname": None,
            "reason": "no driver bound to the virtio device",
        },
    ]
    lines = table.stdout.splitlines()
    at = lines.index("# virtio NICs excluded")
    assert lines[at + 1].split()[:3] == ["PCI", "ADDRESS", "IFNAME"]
    assert [x.split()[0] for x in lines[at + 2 :]] == [
        "0000:00:0a.0",
        "0000:00:0b.0",
        "0000:00:0d.0",
    ]
