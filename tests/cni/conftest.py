"""The rig for ehost-device tests: a node namespace with veth "NICs", pods, and runtime calls.

The plugin runs as a runtime runs it: `ip netns exec <node>` (the node namespace plays the
host), a bare environment (PATH and the CNI_* variables only, plus PYTHONPATH when it runs
from source), the config on stdin. The NICs are veth ends in the node namespace that the fake
sysfs tree (tests/fakesysfs.py) maps to virtio PCI functions; IPAM is Debian's real host-local
or static from /usr/lib/cni.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from executor import MODES, Executor, mode_env
from fakesysfs import FakeSysfs
from netlab import Netns, ip, tag, veth
from toolrun import node_policy, tool_command

CNI_BIN = "/usr/lib/cni"
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class CniRun:
    rc: int
    out: Optional[Dict[str, Any]]
    stdout: str
    stderr: str

    def ok(self) -> Dict[str, Any]:
        assert self.rc == 0, f"rc={self.rc} stdout={self.stdout!r} stderr={self.stderr[-2000:]}"
        return self.out or {}

    def error(self, code: int) -> Dict[str, Any]:
        assert self.rc != 0, f"expected error {code}, got success: {self.stdout!r}"
        assert self.out is not None, f"no JSON on stdout: {self.stdout!r} / {self.stderr!r}"
        assert set(self.out) == {"cniVersion", "code", "msg", "details"}, self.out
        assert self.out["code"] == code, f"expected code {code}: {self.out}"
        assert self.out["msg"], self.out
        return self.out


class Rig:
    """A node namespace and its NICs; `mode` is how the plugin runs: in-process, or through a
    warm executor (`ehost-device serve`) started in the node namespace for this rig."""

    def __init__(self, tmp_path: Path, fake: FakeSysfs, mode: str = "in-process") -> None:
        self.tmp = tmp_path
        self.fake = fake
        self.ipam_dir = tmp_path / "ipam"
        self.namespaces: List[Netns] = []
        self.node = self.netns("cn")
        self.wire = self.netns("cw")
        # The node policy: node-side settings (the fake tree) never come from the config.
        self.policy = tmp_path / "ehost-device.yaml"
        self.write_policy()
        self.mode = mode
        self.executor: Optional[Executor] = None
        self.forwarded = 0  # calls made while an executor was meant to take them
        if mode == "executor":
            try:
                self.executor = Executor(tmp_path, self.node.name)
            except BaseException:
                self.close()
                raise

    def write_policy(self, **settings: Any) -> Path:
        """Rewrite the node policy file: sysfsRoot on the fake tree, plus `settings`."""
        node_policy(self.policy, str(self.fake.root), **settings)
        return self.policy

    # -- building ----------------------------------------------------------------------------
    def netns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self.namespaces.append(ns)
        return ns

    def pod(self) -> Netns:
        return self.netns("cp")

    def nic(self, pci: str, name: str, *, up: bool = True) -> str:
        """A virtio NIC `name` in the node namespace at PCI `pci` (a veth, peer in wire)."""
        veth(self.node, name, self.wire, f"w{tag(6)}", up=True)
        if not up:
            ip("link", "set", name, "down", ns=self.node.name)
        self.fake.add_virtio_nic(pci, name, mac=self.link(name)["address"])
        return name

    def nic_pair(self, pci_a: str, name_a: str, pci_b: str, name_b: str) -> None:
        """Two virtio NICs wired to each other (one veth pair, both ends in the node)."""
        veth(self.node, name_a, self.node, name_b)
        self.fake.add_virtio_nic(pci_a, name_a, mac=self.link(name_a)["address"])
        self.fake.add_virtio_nic(pci_b, name_b, mac=self.link(name_b)["address"])

    def close(self) -> None:
        try:
            if self.executor is not None:
                status = self.executor.stop()
                assert status == 0, f"executor exit status {status}: {self.executor.log()}"
                assert not self.executor.socket_left, "the executor left its socket behind"
                served = self.executor.calls()
                # The executor mode must not pass by silently running in-process.
                assert (
                    self.forwarded == 0 or served
                ), f"executor served nothing: {self.executor.log()}"
        finally:
            for ns in reversed(self.namespaces):
                ns.close()

    # -- reading -----------------------------------------------------------------------------
    def link(self, name: str, ns: Optional[Netns] = None) -> Dict[str, Any]:
        out = ip("-j", "link", "show", "dev", name, ns=(ns or self.node).name).stdout
        return json.loads(out)[0]

    def has_link(self, name: str, ns: Optional[Netns] = None) -> bool:
        r = ip("link", "show", "dev", name, ns=(ns or self.node).name, check=False)
        return r.returncode == 0

    def state(self, name: str, ns: Optional[Netns] = None) -> Dict[str, Any]:
        """What a NIC must get back: name, MAC, MTU, admin state, alias."""
        link = self.link(name, ns)
        return {
            "name": link["ifname"],
            "mac": link["address"],
            "mtu": link["mtu"],
            "up": "UP" in link["flags"],
            "alias": link.get("ifalias"),
        }

    def addresses(self, name: str, ns: Netns) -> List[str]:
        out = json.loads(ip("-j", "addr", "show", "dev", name, ns=ns.name).stdout)
        return [
            f"{a['local']}/{a['prefixlen']}"
            for a in out[0]["addr_info"]
            if a.get("scope") != "link"
        ]

    def leases(self, network: str = "vnet") -> List[str]:
        d = self.ipam_dir / network
        if not d.exists():
            return []
        return sorted(
            p.name for p in d.iterdir() if p.name != "lock" and not p.name.startswith("last_")
        )

    # -- calling the plugin ------------------------------------------------------------------
    def conf(self, version: str = "1.1.0", ipam: Optional[Dict[str, Any]] = None, **kw: Any):
        c: Dict[str, Any] = {
            "cniVersion": version,
            "name": "vnet",
            "type": "ehost-device",
            "ipam": ipam if ipam is not None else self.host_local(),
        }
        c.update(kw)
        return {k: v for k, v in c.items() if v is not None}

    def host_local(self, subnet: str = "198.51.100.0/24", **kw: Any) -> Dict[str, Any]:
        d = {
            "type": "host-local",
            "dataDir": str(self.ipam_dir),
            "ranges": [[{"subnet": subnet, "gateway": subnet.rsplit(".", 1)[0] + ".1"}]],
            "routes": [{"dst": "203.0.113.0/24"}],
        }
        d.update(kw)
        return d

    def cni(
        self,
        command: str,
        conf: Any,
        *,
        pod: Optional[Netns] = None,
        netns: Optional[str] = None,
        ifname: str = "net1",
        container_id: str = "ctr1",
        cni_path: str = CNI_BIN,
        env: Optional[Dict[str, str]] = None,
        drop: tuple = (),
        background: bool = False,
        argv: Optional[List[str]] = None,
    ) -> Any:
        e = {
            "PATH": PATH,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns if netns is not None else (pod.path if pod else ""),
            "CNI_IFNAME": ifname,
            "CNI_PATH": cni_path,
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
            "EHOST_DEVICE_POLICY": str(self.policy),
            **mode_env(self.executor),
        }
        e.update(env or {})
        if e.get("EHOST_DEVICE_SOCKET") and command != "VERSION":
            self.forwarded += 1
        for k in drop:
            e.pop(k, None)
        argv = argv or tool_command("ehost-device")
        if not argv[-1].endswith(".pex") and os.environ.get("PYTHONPATH"):
            e["PYTHONPATH"] = os.environ["PYTHONPATH"]  # from source: how the tool is found
        data = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        cmd = [shutil.which("ip") or "ip", "netns", "exec", self.node.name, *argv]
        if background:  # started now, stdin from a file: the caller communicate()s later
            stdin_file = self.tmp / f"stdin-{tag(8)}.json"
            stdin_file.write_text(data if isinstance(data, str) else data.decode())
            with open(stdin_file) as f:
                return subprocess.Popen(
                    cmd, env=e, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
        p = subprocess.run(
            cmd,
            env=e,
            input=data if isinstance(data, str) else data.decode(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return finish(p.returncode, p.stdout, p.stderr)


def finish(rc: int, stdout: str, stderr: str) -> CniRun:
    out = None
    if stdout.strip():
        out = json.loads(stdout)  # stdout must be JSON and nothing else
    return CniRun(rc, out, stdout, stderr)


def check_result_shape(out: Dict[str, Any], version: str, ifname: str, sandbox: str) -> None:
    """An ADD result, against the shape CNI spec `version` gives it."""
    assert out["cniVersion"] == version
    iface_keys = {"name", "mac", "sandbox"}
    if version == "1.1.0":
        iface_keys |= {"mtu", "pciID"}
    (iface,) = out["interfaces"]
    assert set(iface) == iface_keys, iface
    assert iface["name"] == ifname and iface["sandbox"] == sandbox
    for ip_ in out["ips"]:
        keys = {"address", "gateway", "interface"}
        if version < "1.0.0":
            keys.add("version")
            assert ip_["version"] == ("6" if ":" in ip_["address"] else "4")
        assert set(ip_) <= keys and {"address", "interface"} <= set(ip_), ip_
        assert ip_["interface"] == 0
    for r in out.get("routes", []):
        assert "dst" in r
    assert isinstance(out["dns"], dict)


@pytest.fixture(params=MODES)
def rig(request: pytest.FixtureRequest, tmp_path: Path, fake_sysfs: FakeSysfs) -> Iterator[Rig]:
    r = Rig(tmp_path, fake_sysfs, request.param)
    try:
        yield r
    finally:
        r.close()


# -- the DRA claim tests (test_cni_claims*.py, helpers in claimrig.py) ---------------------------


@pytest.fixture
def dra(rig: Rig) -> Path:
    """The node's DRA state directory, named by the node policy."""
    d = rig.tmp / "dra"
    d.mkdir()
    rig.write_policy(draStateDir=str(d))
    return d


@pytest.fixture
def nics(rig: Rig) -> Dict[str, Any]:
    """Three virtio NICs on the node, and how each looked before any pod."""
    from claimrig import A, B, C

    names = {A: "ens5", B: "ens6", C: "ens7"}
    for pci, name in names.items():
        rig.nic(pci, name)
    return {pci: (name, rig.state(name)) for pci, name in names.items()}
