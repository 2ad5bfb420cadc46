"""virtdp-discover as shipped: output formats, exit codes, bad input, and this machine's eth0."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from fakesysfs import FakeSysfs
from netlab import ip, namespaces, veth
from toolrun import tool_command

KEYS = [
    "pci_address",
    "virtio_name",
    "driver",
    "vendor",
    "device",
    "numa_node",
    "ifname",
    "ifindex",
    "mac",
    "mtu",
    "operstate",
    "carrier",
    "admin_up",
    "visible",
    "default_route",
    "eligible",
    "excluded_reason",
    "problems",
    "pool",
]


def discover(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        tool_command("virtdp-discover") + list(args), capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def lab(fake_sysfs: FakeSysfs, netns):
    """Three fake virtio NICs: eth1 (default route), eth2, and one moved away."""
    with namespaces("vdc") as (peer,):
        veth(netns, "eth1", peer, "p1", mac="52:54:00:00:00:01")
        veth(netns, "eth2", peer, "p2", mac="52:54:00:00:00:02")
        ip("route", "add", "default", "dev", "eth1", ns=netns.name)
        fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1")
        fake_sysfs.add_virtio_nic("0000:00:0b.0", "eth2", legacy=True)
        fake_sysfs.add_virtio_nic("0000:00:0c.0", "eth3")
        fake_sysfs.move_netdev_away("0000:00:0c.0")
        yield ["--sysfs-root", str(fake_sysfs), "--netns", netns.path]


def test_real_machine_eth0_is_listed_and_excluded_for_the_default_route():
    res = discover("-o", "json")
    assert res.returncode == 0, res.stderr
    nics = {n["pci_address"]: n for n in json.loads(res.stdout)}
    eth0 = nics["0000:00:03.0"]
    assert eth0["ifname"] == "eth0" and eth0["driver"] == "virtio_net"
    assert eth0["default_route"] is True and eth0["eligible"] is False
    assert "default route" in eth0["excluded_reason"]
    assert eth0["pool"] is None


def test_json_has_the_documented_keys_and_pools(lab):
    res = discover(*lab, "-o", "json")
    assert res.returncode == 0, res.stderr
    nics = json.loads(res.stdout)
    assert [list(n) for n in nics] == [KEYS] * 3
    eth1, eth2, moved = nics
    assert (eth1["ifname"], eth1["default_route"], eth1["eligible"]) == ("eth1", True, False)
    assert eth1["excluded_reason"] == "carries the IPv4 default route" and eth1["pool"] is None
    assert (eth2["mac"], eth2["device"], eth2["pool"]) == (
        "52:54:00:00:00:02",
        "0x1000",
        "kernel.org/virt",
    )
    assert (moved["visible"], moved["ifname"], moved["pool"]) == (False, None, "kernel.org/virt")
    assert res.stderr == ""


def test_yaml_carries_the_same_data_as_json(lab):
    as_json = json.loads(discover(*lab, "-o", "json").stdout)
    res = discover(*lab, "-o", "yaml")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout) == as_json


def test_table_when_not_a_terminal_is_plain_text(lab):
    res = discover(*lab)
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split()[:3] == ["PCI", "ADDRESS", "VIRTIO"]
    assert "\x1b[" not in res.stdout  # no colour codes in a pipe
    assert len(rows) == 3
    assert (
        rows[0].startswith("0000:00:0a.0") and "excluded: carries the IPv4 default route" in rows[0]
    )
    assert "0x1000 legacy" in rows[1] and rows[1].rstrip().endswith("eligible")
    assert "(not here)" in rows[2]


def test_config_selects_pools(lab, tmp_path):
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(
        "pools:\n"
        "  - resourceName: example.com/legacy\n"
        "    selectors: {devices: ['1000']}\n"
        "  - resourceName: example.com/modern\n"
        "    selectors: {devices: ['1041']}\n"
    )
    res = discover(*lab, "--config", str(cfg), "-o", "json")
    assert res.returncode == 0, res.stderr
    assert [n["pool"] for n in json.loads(res.stdout)] == [
        None,
        "example.com/legacy",
        "example.com/modern",
    ]


@pytest.mark.parametrize(
    "text,key_path",
    [
        ("pools: [\n", "line 2, column 1"),
        ("pools:\n  - resourceName: a.org/x\n    colour: red\n", "pools[0].colour"),
        (
            "pools:\n  - resourceName: a.org/x\n    selectors: {macs: 5}\n",
            "pools[0].selectors.macs",
        ),
        (
            "pools:\n  - resourceName: a.org/x\n    selectors: {pciAddresses: [0000:00:0a]}\n",
            "pools[0].selectors.pciAddresses[0]",
        ),
        (
            "pools:\n  - resourceName: a.org/x\n    selectors: {macs: ['52:54:00:zz:00:01']}\n",
            "pools[0].selectors.macs[0]",
        ),
        ("pools:\n  - resourceName: a.org/x\n  - resourceName: a.org/x\n", "pools[1].resourceName"),
    ],
)
def test_bad_config_exits_2_with_one_clear_error_and_no_stdout(lab, tmp_path, text, key_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    res = discover(*lab, "--config", str(cfg), "-o", "json")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"{cfg}: {key_path}: " in lines[0] and ", expected " in lines[0]


def test_missing_config_file_exits_2(tmp_path):
    res = discover("--config", str(tmp_path / "absent.yaml"))
    assert (res.returncode, res.stdout) == (2, "")
    assert "absent.yaml" in res.stderr


def test_usage_errors_exit_2(tmp_path, fake_sysfs: FakeSysfs):
    missing = f"/var/run/netns/vdcmissing-{os.getpid()}"
    for args in (
        ["-o", "xml"],
        ["--sysfs-root", str(tmp_path / "none")],
        ["--sysfs-root", str(tmp_path)],  # exists, but is no sysfs tree
        ["--sysfs-root", str(fake_sysfs), "--netns", missing],  # never created
        ["--bogus"],
        ["--verbose", "true"],  # a flag takes no value
    ):
        res = discover(*args)
        assert (res.returncode, res.stdout) == (2, ""), args
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "no bus/pci/devices" in discover("--sysfs-root", str(tmp_path)).stderr
    assert not os.path.exists(missing)


def test_failures_exit_1(tmp_path, fake_sysfs: FakeSysfs):
    # A namespace file that is no namespace: the netlink read fails.
    bogus = tmp_path / "not-a-netns"
    bogus.write_text("")
    res = discover("--sysfs-root", str(fake_sysfs), "--netns", str(bogus))
    assert (res.returncode, res.stdout) == (1, "")
    assert str(bogus) in res.stderr


def test_version_and_help():
    res = discover("--version")
    assert res.returncode == 0 and res.stdout.startswith("virtdp-discover ")
    res = discover("--help")
    assert res.returncode == 0
    for opt in ("--config", "--sysfs-root", "--output", "--version"):
        assert opt in res.stdout


def test_damaged_tree_reports_problems_without_failing(fake_sysfs: FakeSysfs, netns):
    fake_sysfs.add_virtio_nic("0000:00:0a.0")
    fake_sysfs.break_pci_link("0000:00:0a.0")
    fake_sysfs.add_virtio_nic("0000:00:0b.0")
    fake_sysfs.make_unreadable("0000:00:0b.0", "numa_node")
    fake_sysfs.add_non_virtio_nic("0000:00:0d.0", "ens13")
    res = discover("--sysfs-root", str(fake_sysfs), "--netns", netns.path, "-o", "json")
    assert res.returncode == 0, res.stderr
    broken, numa = json.loads(res.stdout)
    assert broken["problems"] == ["PCI device link is broken"] and not broken["eligible"]
    assert numa["eligible"] and any("numa_node" in p for p in numa["problems"])
    table = discover("--sysfs-root", str(fake_sysfs), "--netns", netns.path).stdout
    assert "PROBLEMS" in table.splitlines()[0]
