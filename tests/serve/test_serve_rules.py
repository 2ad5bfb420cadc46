"""The allocation rules and device-info files, on plain data (no daemon)."""

from __future__ import annotations

import json
import os
import stat

import grpc
import pytest

from virtcore import devinfo
from virtdp_serve.allocation import AllocationError, DeviceView, env_name, preferred

RES = "kernel.org/virt"


def _ids(*args):
    ids, ignored = preferred(*args)
    assert ignored == []
    return ids


def _devs(spec):
    return {i: DeviceView(i, healthy, numa) for i, (healthy, numa) in spec.items()}


@pytest.mark.parametrize(
    "resource, name",
    [
        ("kernel.org/virt", "PCIDEVICE_KERNEL_ORG_VIRT"),
        ("example.com/fast-net_1", "PCIDEVICE_EXAMPLE_COM_FAST_NET_1"),
        ("a.b/C.d", "PCIDEVICE_A_B_C_D"),
    ],
)
def test_env_name(resource, name):
    assert env_name(resource) == name


def test_preferred_one_numa_node_best_fit():
    devs = _devs(
        {
            "0000:00:01.0": (True, 0),
            "0000:00:02.0": (True, 0),
            "0000:00:03.0": (True, 0),
            "0000:00:04.0": (True, 1),
            "0000:00:05.0": (True, 1),
            "0000:00:06.0": (True, None),
        }
    )
    ids = sorted(devs)
    # Node 1 holds 2 exactly (best fit), node 0 would leave a spare.
    assert _ids(ids, [], 2, RES, devs, {}) == ["0000:00:04.0", "0000:00:05.0"]
    assert _ids(ids, [], 3, RES, devs, {}) == ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0"]
    # No node holds 4: the biggest first, then the next.
    got = _ids(ids, [], 4, RES, devs, {})
    assert got[:3] == ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0"] and len(got) == 4
    # Must-include pulls its node first.
    assert _ids(ids, ["0000:00:02.0"], 2, RES, devs, {}) == ["0000:00:02.0", "0000:00:01.0"]
    assert _ids(ids, ["0000:00:06.0"], 1, RES, devs, {}) == ["0000:00:06.0"]


def test_preferred_without_numa_is_stable_and_healthy_first():
    devs = _devs(
        {"0000:00:03.0": (True, None), "0000:00:01.0": (False, None), "0000:00:02.0": (True, None)}
    )
    assert _ids(["0000:00:03.0", "0000:00:01.0", "0000:00:02.0"], [], 2, RES, devs, {}) == [
        "0000:00:02.0",
        "0000:00:03.0",
    ]


def test_preferred_ignores_ids_that_are_not_the_pools():
    devs = _devs({"0000:00:01.0": (True, 0), "0000:00:02.0": (True, 1)})
    owners = {"0000:00:09.0": "a.io/b"}
    got = preferred(["0000:00:01.0", "0000:00:09.0"], [], 1, RES, devs, owners)
    assert got == (["0000:00:01.0"], ["0000:00:09.0"])
    # An ignored must-include ID; the size shrinks to what is usable.
    got = preferred(["0000:00:07.0", "0000:00:02.0"], ["0000:00:07.0"], 2, RES, devs, owners)
    assert got == (["0000:00:02.0"], ["0000:00:07.0"])
    assert preferred(["x", "y"], [], 2, RES, devs, owners) == ([], ["x", "y"])


def test_preferred_errors_name_the_problem():
    devs = _devs({"0000:00:01.0": (True, 0)})
    with pytest.raises(AllocationError) as e:
        preferred(["0000:00:01.0", "0000:00:01.0"], [], 1, RES, devs, {})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'0000:00:01.0' is listed twice" in e.value.message
    with pytest.raises(AllocationError) as e:
        preferred(["0000:00:01.0"], [], -1, RES, devs, {})
    assert "allocation_size is -1, expected 1 or more" in e.value.message


def test_devinfo_write_read_remove(tmp_path):
    d = str(tmp_path / "new" / "dp")
    path = devinfo.write(d, "kernel.org/virt", "0000:00:0A.0")
    assert os.path.basename(path) == "kernel.org-virt-0000:00:0a.0-device.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert json.loads(open(path).read()) == {
        "type": "pci",
        "version": "1.1.0",
        "pci": {"pci-address": "0000:00:0a.0"},
    }
    # Rewriting the same device replaces the read-only file in one step.
    assert devinfo.write(d, "kernel.org/virt", "0000:00:0a.0") == path
    devinfo.write(d, "kernel.org/virt-fast", "0000:00:0b.0")
    assert devinfo.list_files(d, "kernel.org/virt") == [path]
    assert len(devinfo.list_files(d)) == 2
    assert devinfo.read(path) == devinfo.DeviceInfo("0000:00:0a.0")
    assert devinfo.remove(d, "kernel.org/virt", "0000:00:0a.0") is True
    assert devinfo.remove(d, "kernel.org/virt", "0000:00:0a.0") is False
    assert devinfo.load(d, "kernel.org/virt", "0000:00:0a.0") is None
    assert [n for n in os.listdir(d) if n.startswith(".")] == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("nope", "not JSON"),
        ("[]", "top level is list, expected an object"),
        ('{"type": "pci", "pci": {}}', "version: missing"),
        ('{"type": "net", "version": "1.1.0"}', "type: 'net', expected 'pci'"),
        (
            '{"type": "pci", "version": "1.1.0", "pci": {"pci-address": "x"}}',
            "pci.pci-address: 'x'",
        ),
    ],
)
def test_devinfo_parse_errors(text, message):
    with pytest.raises(devinfo.DevInfoError) as e:
        devinfo.parse(text, "f.json")
    assert str(e.value).startswith("f.json: ") and message in str(e.value)
