"""Bad input at start: a clear message, exit 2, and no socket created."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _no_sockets(lab):
    return sorted(p.name for p in lab.plugin_dir.iterdir() if p.name != "kubelet.sock") in (
        [],
        ["kubelet_internal_checkpoint"],
    )


@pytest.mark.parametrize(
    "text, key_path, expected",
    [
        ("pools: []\n", "pools", "expected a list of at least one pool"),
        ("pools:\n  - resourceName: virt\n", "pools[0].resourceName", "expected <domain>/<name>"),
        (
            "pools:\n  - resourceName: a.io/x\n  - resourceName: a.io/x\n",
            "pools[1].resourceName",
            "expected each resourceName once",
        ),
        ("pools:\n  - resourceName: a.io/x\n    bogus: 1\n", "pools[0].bogus", "expected one of"),
        ("pools: [\n", "line ", "expected a YAML mapping"),
    ],
)
def test_invalid_config(lab, text, key_path, expected):
    lab.add_nic("0000:00:0a.0", "ens10")
    lab.kubelet.start()
    lab.write_config(text)
    res = lab.run(config=True)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert f"{lab.config_path}: {key_path}" in res.stderr
    assert expected in res.stderr
    assert _no_sockets(lab)
    assert not lab.kubelet.registrations


def test_missing_config_file(lab):
    res = lab.run("--config", str(lab.root / "absent.yaml"))
    assert res.returncode == 2
    assert "absent.yaml" in res.stderr and "cannot read the file" in res.stderr
    assert _no_sockets(lab)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics-address", "nonsense"], "expected HOST:PORT"),
        (["--metrics-address", "127.0.0.1:99999"], "expected HOST:PORT"),
        (["--log-format", "xml"], "xml"),
        (["--frobnicate"], "No such option"),
    ],
)
def test_bad_flags(lab, args, message):
    lab.kubelet.start()
    res = lab.run(*args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert _no_sockets(lab)


def test_bad_sysfs_root(lab):
    lab.kubelet.start()
    # --sysfs-root given twice: the later one (the bad one) wins.
    res = lab.run("--sysfs-root", str(lab.root / "nosys"))
    assert res.returncode == 2
    assert "not a sysfs tree" in res.stderr and "expected /sys" in res.stderr
    assert _no_sockets(lab)


def test_metrics_port_in_use(lab):
    lab.kubelet.start()
    # The daemon runs in the node namespace: hold a port there.
    holder = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.node.name,
            sys.executable,
            "-c",
            "import socket,time\n"
            "s=socket.socket();s.bind(('127.0.0.1',0));s.listen()\n"
            "print(s.getsockname()[1],flush=True);time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(holder.stdout.readline())
        res = lab.run("--metrics-address", f"127.0.0.1:{port}")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert res.returncode == 2, res.stderr
    assert f"--metrics-address 127.0.0.1:{port}: cannot listen" in res.stderr
    assert _no_sockets(lab)
