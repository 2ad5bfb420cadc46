"""`ehost-device install-policy`, as the DaemonSet runs it: the ConfigMap's keys go to the host's
/etc/virtdp once they check out as the plugin reads them (the pool config `allowedPools` refers to
included), each file atomically and the policy last; an edit that does not check out is refused
and logged, and the installed files stay. With --watch it follows the kubelet's updates of the
mounted ConfigMap (tests/configmap.py writes them as the kubelet's AtomicWriter does).

The tool runs as shipped (the PEX under Pants), with the manifest's own arguments; only the two
directories are the test's.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import configmap
import pytest
import yaml
from toolrun import tool_command

from virtcore import inotify

Doc = Dict[str, object]


def manifest_args(deployments: Path, name: str = "install-policy") -> List[str]:
    """The installer's arguments in the DaemonSet, after `ehost-device.pex install-policy`."""
    (ds,) = (d for d in yaml.safe_load_all((deployments / "virtdp-daemonset.yaml").read_text()))
    spec = ds["spec"]["template"]["spec"]
    (c,) = (c for c in spec["initContainers"] + spec["containers"] if c["name"] == name)
    cmd = c["command"] + c.get("args", [])
    assert cmd[:2] == ["/opt/virtdp/ehost-device.pex", "install-policy"], cmd
    return list(cmd[2:])


def shipped_data(deployments: Path) -> Dict[str, str]:
    (cm,) = (d for d in yaml.safe_load_all((deployments / "virtdp-config.yaml").read_text()))
    return dict(cm["data"])


class Node:
    """The mounted ConfigMap and the host's /etc/virtdp of one test."""

    def __init__(self, deployments: Path, tmp: Path) -> None:
        self.cm = tmp / "configmap"
        self.host = tmp / "host-etc-virtdp"
        self.cm.mkdir()
        self.host.mkdir()
        self.data = shipped_data(deployments)
        args = manifest_args(deployments)
        # The manifest's --from/--to are the container's mounts; here, the test's directories.
        for flag, path in (("--from", self.cm), ("--to", self.host)):
            args[args.index(flag) + 1] = str(path)
        self.args = args

    def edit(self, **changes: str) -> None:
        """An edit of the ConfigMap (key -> new value), as the kubelet projects it."""
        self.data.update(changes)
        configmap.project(self.cm, self.data)

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*tool_command("ehost-device"), "install-policy", *self.args, *extra],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )

    def installed(self) -> Dict[str, Tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(self.host.iterdir())}


@pytest.fixture
def node(deployments: Path, tmp_path: Path) -> Node:
    return Node(deployments, tmp_path)


ALLOWED = "allowedPools: [kernel.org/virt]\n"


def test_installs_every_key_policy_last_and_leaves_current_files_alone(node: Node) -> None:
    node.edit(**{"ehost-device.yaml": node.data["ehost-device.yaml"] + ALLOWED})
    watch = inotify.Inotify()
    try:
        watch.watch(str(node.host))
        p = node.run()
        assert p.returncode == 0, p.stderr
        renamed = [e.name for e in watch.read() if e.mask & inotify.IN_MOVED_TO]
    finally:
        watch.close()
    # The pool config lands before the policy that refers to it.
    assert renamed == ["config.yaml", "ehost-device.yaml"]
    files = node.installed()
    assert {k: v[0].decode() for k, v in files.items()} == node.data
    assert all((node.host / k).stat().st_mode & 0o777 == 0o644 for k in files)
    assert "installed /etc/virtdp/ehost-device.yaml" in p.stderr
    # Again (a pod restart): nothing is rewritten.
    again = node.run()
    assert again.returncode == 0 and "is current" in again.stderr, again.stderr
    assert node.installed() == files


GOOD_POOLS = """pools:
  - resourceName: kernel.org/virt
    selectors: {drivers: [virtio_net]}
"""


@pytest.mark.parametrize(
    "case, changes, named",
    [
        ("not YAML", {"ehost-device.yaml": "logLevel: [info\n"}, "not valid YAML"),
        ("unknown key", {"ehost-device.yaml": "allowPools: [kernel.org/virt]\n"}, "allowPools"),
        (
            "a pool the pool config lacks",
            {"ehost-device.yaml": "allowedPools: [kernel.org/nope]\n"},
            "allowedPools[0]: 'kernel.org/nope' is not a pool of /etc/virtdp/config.yaml",
        ),
        (
            "a pool config not installed by it",
            {"ehost-device.yaml": ALLOWED + "poolConfig: /etc/other/config.yaml\n"},
            "poolConfig: /etc/other/config.yaml is not a file this installer puts on the node",
        ),
        (
            "a pool config the plugin cannot read",
            {
                "ehost-device.yaml": ALLOWED,
                "config.yaml": "pools:\n  - &p {resourceName: kernel.org/virt}\n",
            },
            "/etc/virtdp/config.yaml: line 2: not valid YAML",
        ),
        (
            "a log file the executor cannot reach",
            {"ehost-device.yaml": "logFile: /var/log/ehost-device.log\n"},
            "logFile: /var/log is outside the host directories the executor container mounts",
        ),
        (
            "a sysfs tree the executor cannot reach",
            {"ehost-device.yaml": "sysfsRoot: /opt/sys\n"},
            "sysfsRoot: /opt/sys is outside the host directories",
        ),
        (
            "a socket the executor does not serve",
            {"ehost-device.yaml": "executorSocket: /run/other/ehost-device.sock\n"},
            "executorSocket: '/run/other/ehost-device.sock' is not the socket the executor "
            "container serves, expected /run/virtdp/ehost-device.sock",
        ),
    ],
)
def test_an_edit_that_does_not_check_out_is_refused(
    node: Node, case: str, changes: Dict[str, str], named: str
) -> None:
    node.edit(**{"ehost-device.yaml": "logLevel: debug\n" + ALLOWED, "config.yaml": GOOD_POOLS})
    assert node.run().returncode == 0
    good = node.installed()
    node.edit(**changes)
    p = node.run()
    # The last good files stay, whole (same inodes), and the refusal names what and where.
    assert p.returncode == 0, p.stderr
    assert node.installed() == good
    assert "refused the ConfigMap's node policy" in p.stderr and named in p.stderr, p.stderr
    assert "expected" in p.stderr
    assert "/etc/virtdp/ehost-device.yaml stays as it is" in p.stderr


def test_a_new_node_without_a_policy_that_checks_out_stops_the_pod(node: Node) -> None:
    # Exit 1 in the init container: the plugin (installed after it) never runs on this node
    # without the policy the ConfigMap asks for.
    node.edit(**{"ehost-device.yaml": "allowedPools: [kernel.org/nope]\n"})
    p = node.run()
    assert p.returncode == 1
    assert "refused" in p.stderr
    assert node.installed() == {}
    del node.data["ehost-device.yaml"]
    configmap.project(node.cm, node.data)
    p = node.run()
    assert p.returncode == 1 and "has no such key" in p.stderr, p.stderr


class Watcher:
    """`install-policy --watch` running, its stderr lines in a queue."""

    def __init__(self, node: Node) -> None:
        self.proc = subprocess.Popen(
            [*tool_command("ehost-device"), "install-policy", *node.args, "--watch"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: List[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        threading.Thread(target=lambda: [self.lines.put(x) for x in stderr], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in {timeout}s; got {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line

    def switches(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)

    def wait_blocked(self, timeout: float = 30) -> str:
        """Once the process sleeps in a select/poll (its kernel wait channel), that channel."""
        deadline = time.monotonic() + timeout
        while True:
            wchan = Path(f"/proc/{self.proc.pid}/wchan").read_text()
            if "poll" in wchan or "select" in wchan:
                return wchan
            assert time.monotonic() < deadline, f"not waiting in select/poll: {wchan!r}"
            time.sleep(0.05)


@pytest.fixture
def watcher(node: Node) -> Iterator[Watcher]:
    node.edit()
    w = Watcher(node)
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait(timeout=30)


def test_watch_follows_configmap_updates_and_keeps_the_last_good_files(
    node: Node, watcher: Watcher
) -> None:
    watcher.wait_for("watching")
    assert node.installed()["ehost-device.yaml"][0].decode() == node.data["ehost-device.yaml"]

    # Between updates it sleeps in one blocking wait: no wake-ups, whatever the wait.
    watcher.wait_blocked()
    before = watcher.switches()
    time.sleep(1.0)
    assert watcher.switches() == before, "the watcher woke up with nothing to do"

    node.edit(**{"ehost-device.yaml": "logLevel: debug\n" + ALLOWED})
    watcher.wait_for("installed /etc/virtdp/ehost-device.yaml")
    assert (node.host / "ehost-device.yaml").read_text() == node.data["ehost-device.yaml"]
    good = node.installed()

    node.edit(**{"ehost-device.yaml": "logLevel: debug\nallowedPools: [kernel.org/nope]\n"})
    line = watcher.wait_for("refused")
    assert "allowedPools[0]" in line
    assert node.installed() == good

    node.edit(**{"ehost-device.yaml": "logLevel: info\n"})
    watcher.wait_for("installed /etc/virtdp/ehost-device.yaml")
    assert (node.host / "ehost-device.yaml").read_text() == "logLevel: info\n"

    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.proc.wait(timeout=30) == 0
    # The kubelet's update leaves only the new timestamped directory: the watcher follows
    # the `..data` swap, not the files it read the first time.
    assert len([p for p in node.cm.iterdir() if p.name.startswith("..2")]) == 1
