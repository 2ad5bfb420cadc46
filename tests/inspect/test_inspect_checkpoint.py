"""The kubelet checkpoint: both formats read, every kind of damage one clear error, and the
`checkpoint` command's report and sanity checks against the node's (fake sysfs) NICs."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from inspectlab import inspect, inspect_json, one_line_error, pci_domain
from testpodresources import Container, Pod, checkpoint_json

from virtcore import checkpoint
from virtcore.kubelet import deviceplugin_pb2

RES = "kernel.org/virt"


def _pods(a: str, b: str):
    return [
        Pod("web", "default", "uid-web", [Container("app", {RES: {0: [a]}})]),
        Pod(
            "db",
            "prod",
            "uid-db",
            [Container("main", {RES: {-1: [b]}, "vendor.com/gpu": {1: ["GPU-1"]}})],
        ),  # noqa: E501
    ]


def _write(tmp_path, text: str, name: str = "kubelet_internal_checkpoint") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_numa_keyed_format_is_read_with_nodes_and_alloc_envs(tmp_path):
    text = checkpoint_json(_pods("0000:00:0a.0", "0000:00:0b.0"), {RES: {0: ["0000:00:0a.0"]}})
    ck = checkpoint.parse(text, "ck")
    assert ck.format == checkpoint.FORMAT_NUMA
    assert ck.checksum == 1234567890
    web, db_net, db_gpu = ck.entries
    assert (web.pod_uid, web.container_name, web.resource_name) == ("uid-web", "app", RES)
    assert web.devices == (checkpoint.DeviceID("0000:00:0a.0", 0),)
    assert dict(web.envs) == {"PCIDEVICE_KERNEL_ORG_VIRT": "0000:00:0a.0"}
    assert db_net.devices == (checkpoint.DeviceID("0000:00:0b.0", -1),)
    assert db_gpu.resource_name == "vendor.com/gpu" and db_gpu.device_ids == ("GPU-1",)
    assert ck.registered(RES) == ("0000:00:0a.0",)


def test_flat_format_of_kubernetes_1_19_is_read_without_numa(tmp_path):
    text = checkpoint_json(_pods("0000:00:0a.0", "0000:00:0b.0"), {}, flat=True)
    ck = checkpoint.parse(text, "ck")
    assert ck.format == checkpoint.FORMAT_FLAT
    assert ck.entries[0].devices == (checkpoint.DeviceID("0000:00:0a.0", None),)
    assert ck.registered_devices == ()


def test_go_nulls_are_empty():
    doc = {
        "Data": {
            "PodDeviceEntries": [
                {
                    "PodUID": "u",
                    "ContainerName": "c",
                    "ResourceName": RES,
                    "DeviceIDs": {"0": None},
                    "AllocResp": None,
                }
            ],
            "RegisteredDevices": {RES: None},
        },
        "Checksum": 7,
    }
    ck = checkpoint.parse(json.dumps(doc), "ck")
    assert ck.entries[0].devices == () and ck.registered(RES) == ()
    empty = checkpoint.parse(json.dumps({"Data": {"PodDeviceEntries": None}, "Checksum": 1}), "x")
    assert empty.entries == () and empty.format is None


def test_undecodable_alloc_resp_is_a_problem_on_the_entry_not_an_error():
    doc = json.loads(checkpoint_json(_pods("0000:00:0a.0", "0000:00:0b.0"), {}))
    doc["Data"]["PodDeviceEntries"][0]["AllocResp"] = base64.b64encode(b"\xff\xff\xff").decode()
    doc["Data"]["PodDeviceEntries"][1]["AllocResp"] = "not base64!"
    ck = checkpoint.parse(json.dumps(doc), "ck")
    assert "not a ContainerAllocateResponse" in (ck.entries[0].alloc_problem or "")
    assert "not valid base64" in (ck.entries[1].alloc_problem or "")
    ok = deviceplugin_pb2.ContainerAllocateResponse(annotations={"a": "b"})
    doc["Data"]["PodDeviceEntries"][0]["AllocResp"] = base64.b64encode(
        ok.SerializeToString()
    ).decode()
    assert checkpoint.parse(json.dumps(doc), "ck").entries[0].annotations == (("a", "b"),)


GOOD = json.loads(checkpoint_json(_pods("0000:00:0a.0", "0000:00:0b.0"), {RES: {0: ["x"]}}))


def _damaged(change):
    doc = json.loads(json.dumps(GOOD))
    change(doc)
    return json.dumps(doc)


@pytest.mark.parametrize(
    "text, key_path, words",
    [
        ("", "", "is empty"),
        ("   \n", "", "is empty"),
        (json.dumps(GOOD)[:57], "", "looks truncated"),
        ("Data: {}", "", "not valid JSON at line 1 column 1"),
        ("[1, 2]", "", "top level is a list, expected an object with Data"),
        ('{"Checksum": 1}', "Data", "missing, expected an object with PodDeviceEntries"),
        ('{"Data": "x"}', "Data", "is a string, expected an object"),
        (_damaged(lambda d: d.__setitem__("Checksum", "abc")), "Checksum", "unsigned integer"),
        (
            _damaged(lambda d: d["Data"].__setitem__("PodDeviceEntries", {"a": 1})),
            "Data.PodDeviceEntries",
            "is an object, expected a list",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"].__setitem__(1, "x")),
            "Data.PodDeviceEntries[1]",
            "is a string, expected an object",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"][0].pop("PodUID")),
            "Data.PodDeviceEntries[0].PodUID",
            "missing, expected a string",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"][0].__setitem__("ResourceName", 5)),
            "Data.PodDeviceEntries[0].ResourceName",
            "is a number, expected a string",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"][0].__setitem__("DeviceIDs", "id")),
            "Data.PodDeviceEntries[0].DeviceIDs",
            "expected IDs keyed by NUMA node or a list of IDs",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"][0].pop("DeviceIDs")),
            "Data.PodDeviceEntries[0].DeviceIDs",
            "missing",
        ),
        (
            _damaged(
                lambda d: d["Data"]["PodDeviceEntries"][0].__setitem__("DeviceIDs", {"zero": []})
            ),
            "Data.PodDeviceEntries[0].DeviceIDs['zero']",
            "not a NUMA node number",
        ),
        (
            _damaged(
                lambda d: d["Data"]["PodDeviceEntries"][0].__setitem__("DeviceIDs", {"0": [1]})
            ),
            "Data.PodDeviceEntries[0].DeviceIDs['0'][0]",
            "is a number, expected a device ID string",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"][0].__setitem__("DeviceIDs", ["a"])),
            "Data.PodDeviceEntries",
            "mixes DeviceIDs keyed by NUMA node with flat lists",
        ),
        (
            _damaged(lambda d: d["Data"].__setitem__("RegisteredDevices", ["a"])),
            "Data.RegisteredDevices",
            "expected an object of resource name to device IDs",
        ),
        (
            _damaged(lambda d: d["Data"]["PodDeviceEntries"][0].__setitem__("AllocResp", 3)),
            "Data.PodDeviceEntries[0].AllocResp",
            "expected a base64 string",
        ),
    ],
)
def test_every_kind_of_damage_names_the_key_and_what_was_expected(text, key_path, words):
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.parse(text, "/x/ck")
    assert err.value.key_path == key_path
    assert str(err.value).startswith("/x/ck: ")
    assert words in str(err.value)


def test_load_refuses_missing_directory_and_binary_and_never_writes(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        checkpoint.load(str(tmp_path / "nope"))
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.load(str(tmp_path))
    (tmp_path / "bin").write_bytes(b"\x80\x81{}")
    with pytest.raises(checkpoint.CheckpointError, match="not UTF-8"):
        checkpoint.load(str(tmp_path / "bin"))
    path = _write(tmp_path, json.dumps(GOOD))
    os.chmod(path, 0o444)
    before = (os.stat(path).st_mtime_ns, open(path).read())
    assert checkpoint.load(path).entries
    assert (os.stat(path).st_mtime_ns, open(path).read()) == before
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444


# -- the `checkpoint` command ------------------------------------------------------------------
def test_command_reports_entries_and_finds_ids_no_nic_matches(tmp_path, fake_sysfs, netns):
    dom = pci_domain()
    a, b, gone = f"{dom}:00:0a.0", f"{dom}:00:0b.0", f"{dom}:00:1f.0"
    fake_sysfs.add_virtio_nic(a, numa_node=0)
    fake_sysfs.add_virtio_nic(b)
    pods = _pods(a, gone)
    path = _write(
        tmp_path, checkpoint_json(pods, {RES: {0: [a, b]}, "vendor.com/gpu": {1: ["GPU-1"]}})
    )
    args = (
        "checkpoint",
        "--checkpoint",
        path,
        "--sysfs-root",
        str(fake_sysfs),
        "--netns",
        netns.path,
    )  # noqa: E501
    doc, proc = inspect_json(*args)
    assert proc.returncode == 1, proc.stderr  # a sanity check failed
    assert doc["path"] == path and doc["format"] == "numa" and doc["checksum"] == 1234567890
    assert doc["checked_resources"] == [RES]  # the GPU's IDs are not PCI addresses
    assert [(e["pod_uid"], e["container"], e["resource"]) for e in doc["entries"]] == [
        ("uid-web", "app", RES),
        ("uid-db", "main", RES),
        ("uid-db", "main", "vendor.com/gpu"),
    ]
    assert doc["entries"][0]["devices"] == [{"id": a, "numa_node": 0}]
    assert doc["entries"][0]["envs"] == {"PCIDEVICE_KERNEL_ORG_VIRT": a}
    assert doc["registered_devices"] == {RES: [a, b], "vendor.com/gpu": ["GPU-1"]}
    errors = [f for f in doc["findings"] if f["severity"] == "error"]
    assert [(f["resource"], f["device_id"]) for f in errors] == [(RES, gone)]
    assert "no virtio NIC on this node has this PCI address" in errors[0]["message"]
    warnings = [
        (f["resource"], f["device_id"]) for f in doc["findings"] if f["severity"] == "warning"
    ]  # noqa: E501
    assert (RES, gone) in warnings  # allocated but not registered
    assert "1 errors" in proc.stderr

    # The same file once the NIC is back: clean, exit 0; the table names every entry.
    fake_sysfs.add_virtio_nic(gone)
    path2 = _write(
        tmp_path,
        checkpoint_json(pods, {RES: {0: [a, b, gone]}, "vendor.com/gpu": {1: ["GPU-1"]}}),
        "ck2",
    )  # noqa: E501
    doc, proc = inspect_json(
        "checkpoint", "--checkpoint", path2, "--sysfs-root", str(fake_sysfs), "--netns", netns.path
    )  # noqa: E501
    assert proc.returncode == 0, proc.stderr
    assert doc["findings"] == []
    table = inspect(
        "checkpoint", "--checkpoint", path2, "--sysfs-root", str(fake_sysfs), "--netns", netns.path
    )  # noqa: E501
    assert table.returncode == 0
    for word in ("uid-web", "uid-db", a, gone, "GPU-1", "registered devices"):
        assert word in table.stdout


def test_command_flags_double_allocation_and_reads_flat_format(tmp_path, fake_sysfs, netns):
    a = f"{pci_domain()}:00:0a.0"
    fake_sysfs.add_virtio_nic(a)
    pods = [
        Pod("p1", "default", "uid-1", [Container("c", {RES: {-1: [a]}})]),
        Pod("p2", "default", "uid-2", [Container("c", {RES: {-1: [a]}})]),
    ]
    path = _write(tmp_path, checkpoint_json(pods, {RES: {-1: [a]}}, flat=True))
    doc, proc = inspect_json(
        "checkpoint", "--checkpoint", path, "--sysfs-root", str(fake_sysfs), "--netns", netns.path
    )  # noqa: E501
    assert proc.returncode == 1
    assert doc["format"] == "flat"
    assert doc["entries"][0]["devices"] == [{"id": a, "numa_node": None}]
    [finding] = doc["findings"]
    assert (
        finding["severity"] == "error"
        and "allocated to 2 pods at once: uid-1, uid-2" in finding["message"]
    )  # noqa: E501
    assert "Kubernetes 1.19 or older" in proc.stderr


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "no such file"),
        ("", "is empty"),
        ('{"Data": {"PodDeviceEntries": [{"PodUID": "u", "Contai', "looks truncated"),
        ("<html>", "not valid JSON"),
        ('{"Data": {"PodDeviceEntries": 5}, "Checksum": 1}', "Data.PodDeviceEntries: is a number"),
    ],
)
def test_command_bad_checkpoint_is_one_line_exit_1(tmp_path, fake_sysfs, content, words):
    path = tmp_path / "ck"
    if content is not None:
        path.write_text(content)
    proc = inspect("checkpoint", "--checkpoint", str(path), "--sysfs-root", str(fake_sysfs))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert str(path) in line and words in line
    assert proc.stdout == ""


def test_command_usage_errors_exit_2(tmp_path):
    proc = inspect("checkpoint", "--sysfs-root", str(tmp_path))
    assert proc.returncode == 2
    assert "not a sysfs tree" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = inspect("checkpoint", "-o", "xml")
    assert proc.returncode == 2
    proc = inspect("allocations", "--timeout", "0")
    assert proc.returncode == 2 and "not a positive number of seconds" in proc.stderr
