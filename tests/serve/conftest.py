"""The virtdp-serve test bench: a node namespace with veth "NICs", a fake PCI tree naming them,
the test kubelet (device plugin and DRA sides), the test API server (listening inside the node
namespace, where the daemon reaches it on loopback), and the daemon run as shipped inside the
node namespace (hostNetwork)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from fakesysfs import FakeSysfs
from netlab import Netns, ip, veth
from testapiserver import TestApiServer
from testkubelet import TestKubelet
from testkubeletdra import TestDraKubelet
from toolrun import tool_command

from virtcore import claims

NODE = "node-a"
DRIVER = claims.DEFAULT_DRIVER


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeLab:
    def __init__(self) -> None:
        # Unix socket paths are limited to 107 bytes: keep the tree short, not under tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix="vdp-", dir="/tmp"))
        self.plugin_dir = self.root / "dp"
        self.devinfo_dir = self.root / "devinfo"
        self.config_path = self.root / "pools.yaml"
        self.sysfs = FakeSysfs(self.root / "sys")
        self.plugin_dir.mkdir()
        self.registry_dir = self.root / "reg"
        self.kubelet_plugins_dir = self.root / "plugins"
        self.dra_state_dir = self.root / "dra"
        self.namespaces: List[Netns] = []
        self.kubelet = TestKubelet(str(self.plugin_dir))
        self._dra_kubelet: Optional[TestDraKubelet] = None
        self._api: Optional[TestApiServer] = None
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.root / "serve.log"
        self.metrics_port: Optional[int] = None
        try:
            self.node = self._netns("vsn")  # the node's namespace, where the daemon runs
            self.wire = self._netns("vsw")  # the far ends of the "cables"
        except BaseException:
            self.close()
            raise

    def _netns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self.namespaces.append(ns)
        return ns

    # -- NICs ------------------------------------------------------------------------------
    def add_nic(
        self,
        pci_address: str,
        ifname: str,
        *,
        numa_node: int = -1,
        mac: Optional[str] = None,
        up: bool = True,
        legacy: bool = False,
    ) -> None:
        """A virtio NIC: `ifname` (a veth end in the node namespace) under `pci_address`."""
        veth(self.node, ifname, self.wire, "w" + ifname, mac=mac, up=up)
        if not up:
            ip("link", "set", "w" + ifname, "up", ns=self.wire.name)
        shown = ip("-j", "link", "show", ifname, ns=self.node.name).stdout
        real_mac = json.loads(shown)[0]["address"]
        self.sysfs.add_virtio_nic(
            pci_address, ifname, numa_node=numa_node, mac=real_mac, legacy=legacy
        )

    def cable(self, ifname: str, plugged: bool) -> None:
        """Carrier of `ifname`: its far end up (carrier) or down (cable pulled)."""
        ip("link", "set", "w" + ifname, "up" if plugged else "down", ns=self.wire.name)

    def link_admin(self, ifname: str, up: bool) -> None:
        ip("link", "set", ifname, "up" if up else "down", ns=self.node.name)

    def move_to_pod(self, pci_address: str, ifname: str) -> Netns:
        """What ehost-device does: the NIC's netdev goes into a pod namespace."""
        pod = self._netns("vsq")
        self.sysfs.move_netdev_away(pci_address)
        ip("link", "set", ifname, "netns", pod.name, ns=self.node.name)
        return pod

    def uevent(self, ifname: str, action: str = "change") -> None:
        """Make the kernel emit a real uevent for the netdev `ifname` of the node namespace (it
        goes to uevent sockets in that namespace): what a hot-plug, unbind/bind or unplug of the
        NIC would announce, after the test changed the fake PCI tree to match."""
        # `ip netns exec` mounts the node namespace's own /sys, where `ifname` is listed.
        self.node.exec("sh", "-c", f"echo {action} > /sys/class/net/{ifname}/uevent")

    def metric(self, text: str) -> float:
        """The value of one series of /metrics (`name{labels}` as exposed), 0 when absent."""
        for line in self.http("/metrics")[1].splitlines():
            name, _, value = line.rpartition(" ")
            if name == text:
                return float(value)
        return 0.0

    # -- config ----------------------------------------------------------------------------
    def write_config(self, text: str) -> str:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)
        return str(self.config_path)

    # -- the daemon ------------------------------------------------------------------------
    def command(self, *extra: str, config: bool = False, metrics: bool = False) -> List[str]:
        cmd = [
            "ip",
            "netns",
            "exec",
            self.node.name,
            *tool_command("virtdp-serve"),
            "--device-plugin-dir",
            str(self.plugin_dir),
            "--devinfo-dir",
            str(self.devinfo_dir),
            "--sysfs-root",
            str(self.sysfs.root),
        ]
        if config:
            cmd += ["--config", str(self.config_path)]
        if metrics:
            self.metrics_port = free_port()
            cmd += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        return cmd + list(extra)

    def start(self, *extra: str, config: bool = False, metrics: bool = False) -> subprocess.Popen:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(*extra, config=config, metrics=metrics),
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        return self.proc

    def run(
        self, *extra: str, config: bool = False, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Run the daemon to completion (for start-up failures)."""
        return subprocess.run(
            self.command(*extra, config=config),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def signal(self, sig: int = signal.SIGTERM, timeout: float = 15) -> Tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"virtdp-serve did not exit within {timeout}s of {sig}") from None
        out = ""
        if self.proc.stdout:
            out = self.proc.stdout.read().decode()
            self.proc.stdout.close()
        rc = self.proc.returncode
        self.proc = None
        return rc, out

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the daemon's log within {timeout}s:\n{self.log()}")

    def http(self, path: str) -> Tuple[int, str]:
        assert self.metrics_port is not None
        # The daemon listens inside the node namespace: connect from there.
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    url = 'http://127.0.0.1:{self.metrics_port}{path}'\n"
            "    r = urllib.request.urlopen(url, timeout=5)\n"
            "    print(r.status); sys.stdout.write(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); sys.stdout.write(e.read().decode())\n"
        )
        out = self.node.exec(sys.executable, "-c", code).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def socket_path(self, resource: str) -> Path:
        return self.plugin_dir / (resource.replace("/", "_") + ".sock")

    # -- DRA -------------------------------------------------------------------------------
    @property
    def dra_kubelet(self) -> TestDraKubelet:
        """The kubelet's DRA side, with its client to the test API server (slice wiping)."""
        if self._dra_kubelet is None:
            self._dra_kubelet = TestDraKubelet(str(self.registry_dir), api=self.api, node=NODE)
        return self._dra_kubelet

    @dra_kubelet.setter
    def dra_kubelet(self, kubelet: TestDraKubelet) -> None:
        if self._dra_kubelet is not None:
            self._dra_kubelet.stop()
        self._dra_kubelet = kubelet

    @property
    def api(self) -> TestApiServer:
        """The test API server on 127.0.0.1 of the node namespace (where the daemon runs)."""
        if self._api is None:
            self._api = TestApiServer(netns=self.node.path)
            self._api.start()
        return self._api

    def dra_args(self, mode: str = "dra", *extra: str) -> List[str]:
        kubeconfig = self.api.kubeconfig(str(self.root / "kubeconfig"))
        return [
            "--mode",
            mode,
            "--node-name",
            NODE,
            "--kubelet-registry-dir",
            str(self.registry_dir),
            "--kubelet-plugins-dir",
            str(self.kubelet_plugins_dir),
            "--dra-state-dir",
            str(self.dra_state_dir),
            "--kubeconfig",
            kubeconfig,
            *extra,
        ]

    @property
    def registration_socket(self) -> Path:
        return self.registry_dir / f"{DRIVER}-reg.sock"

    @property
    def dra_socket(self) -> Path:
        return self.kubelet_plugins_dir / DRIVER / "dra.sock"

    def claim(
        self,
        name: str,
        devices: Sequence[str] = (),
        *,
        pods: Sequence[Tuple[str, str]] = (("pod-uid-1", "pod-1"),),
        namespace: str = "default",
        requests: Optional[Sequence[str]] = None,
        config: Sequence[Dict[str, Any]] = (),
        driver: str = DRIVER,
        pool: str = NODE,
        node: str = NODE,
        allocated: bool = True,
    ) -> Dict[str, Any]:
        """A ResourceClaim in the API server, allocated as the scheduler does it: one result per
        PCI address in `devices` (request "nic" unless `requests` names each), pinned to `node`,
        reserved for `pods` (uid, name)."""
        obj = self.api.create(
            "resourceclaims",
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "devices": {
                        "requests": [
                            {"name": r, "exactly": {"deviceClassName": DRIVER}}
                            for r in sorted(set(requests or ["nic"]))
                        ]
                    }
                },
            },
        )
        if not allocated:
            return obj
        reqs = list(requests or ["nic"] * len(devices))
        obj["status"] = {
            "allocation": {
                "devices": {
                    "results": [
                        {
                            "request": r,
                            "driver": driver,
                            "pool": pool,
                            "device": claims.device_name(d),
                        }
                        for r, d in zip(reqs, devices)
                    ],
                    "config": list(config),
                },
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [node]}
                            ]
                        }
                    ]
                },
            },
            "reservedFor": [
                {"resource": "pods", "name": pod_name, "uid": uid} for uid, pod_name in pods
            ],
        }
        return self.api.update("resourceclaims", obj, subresource="status")

    def record(self) -> Dict[str, claims.PreparedClaim]:
        return claims.load(str(self.dra_state_dir))

    def close(self) -> None:
        """Idempotent; each step runs even when an earlier one failed."""
        try:
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
                if self.proc.stdout:
                    self.proc.stdout.close()
                self.proc = None
        finally:
            try:
                self.kubelet.stop()
                if self._dra_kubelet is not None:
                    self._dra_kubelet.stop()
                if self._api is not None:
                    self._api.stop()
            finally:
                for ns in reversed(self.namespaces):
                    ns.close()
                self.namespaces.clear()
                shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[ServeLab]:
    bench = ServeLab()
    try:
        yield bench
    finally:
        bench.close()
