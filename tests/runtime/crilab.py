"""A node whose pods are made by a real containerd (CRI), with ehost-device as their network.

- The node is a network namespace; its NICs are veth ends there, mapped to virtio PCI functions
  by the fake sysfs tree (tests/fakesysfs.py), in wired pairs (`nic_pair`): the pods holding the
  two ends of a pair reach each other over their NICs.
- containerd (tests/runtime/containerd.py) runs in that namespace and calls the CNI plugins of a
  private bin dir the way it does on a node: its own libcni, `CNI_IFNAME=eth0`, its environment
  passed down, DEL twice per pod, the conflist as it is at each call. The bin dir holds
  ehost-device as the suite runs tools (the shipped PEX under Pants, `toolrun.tool_command`) and
  Debian's host-local (and host-device, for the benchmark).
- The conflist names the NIC by `deviceID` (what Multus would inject); with one conflist per
  node, the lab rewrites it before each RunPodSandbox and waits until containerd has loaded it.
- `account()` says what a run lost: NICs not back home as they were, host-local leases left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import containerd as ctd
import cri_api_pb2 as api
from executor import Executor, mode_env
from fakesysfs import FakeSysfs
from netlab import Netns, ip, tag, veth
from toolrun import node_policy, tool_command

CNI_BIN = "/usr/lib/cni"
SUBNET = "198.51.100.0/24"
# Modes the plugin runs in under containerd: the plugin does the work itself, or hands it to a
# warm executor (`ehost-device serve`) in the node namespace. Set up in `CriLab.__init__`
# (`_mode_env`); every scenario runs in each.
MODES = ("in-process", "executor")


@dataclass
class Nic:
    pci: str
    name: str
    state: Dict[str, Any] = field(default_factory=dict)  # as it was before any pod


@dataclass
class Pod:
    name: str
    id: str
    config: Any
    nic: Optional[Nic]
    netns: str = ""
    ip: str = ""


class CriLab:
    def __init__(self, tmp: Path, *, mode: str = "in-process") -> None:
        self.tmp = tmp
        self.mode = mode
        self.network = f"vcri-{tag(6)}"
        self.namespaces: List[Netns] = []
        self.nics: Dict[str, Nic] = {}
        self.pods: List[Pod] = []
        self.all_pods: List[Pod] = []  # every sandbox run, removed or not
        self.sandboxes_run = 0
        self.ctd: Optional[ctd.Containerd] = None
        self.executor: Optional[Executor] = None
        # containerd's sockets must fit a sun_path (108 bytes): a short dir of its own.
        ctd.sweep_stale()
        self.root = Path(tempfile.mkdtemp(prefix=ctd.ROOT_PREFIX, dir="/tmp"))
        try:
            self.node = self._netns("crn")
            self.fake = FakeSysfs(tmp / "sys")
            self.ipam_dir = tmp / "ipam"
            self.bin = tmp / "cni-bin"
            self.conf_dir = tmp / "net.d"
            self.bin.mkdir()
            self.conf_dir.mkdir()
            self._install_plugins()
            # The node policy (the fake tree) reaches the plugin through containerd's
            # environment, which containerd passes to every CNI plugin it runs.
            self.policy = tmp / "ehost-device-policy.yaml"
            env = node_policy(self.policy, str(self.fake.root))
            env.update(self._mode_env())
            self.ctd = ctd.Containerd(
                self.root, self.node.path, cni_bin=self.bin, cni_conf=self.conf_dir, env=env
            )
            self.ctd.record(namespaces=[ns.name for ns in self.namespaces], network=self.network)
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------------------------
    def _netns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self.namespaces.append(ns)
        return ns

    def _mode_env(self) -> Dict[str, str]:
        """The environment containerd passes its CNI plugins for this mode; never the node's
        default socket /run/virtdp/ehost-device.sock, which is not ours."""
        if self.mode == "in-process":
            return mode_env(None)
        if self.mode == "executor":
            self.executor = Executor(self.tmp, self.node.name)
            return mode_env(self.executor)
        raise ValueError(f"unknown ehost-device mode {self.mode!r}; expected one of {MODES}")

    def _install_plugins(self) -> None:
        argv = tool_command("ehost-device")
        target = self.bin / "ehost-device"
        if len(argv) == 1:  # the shipped PEX: containerd execs the file itself
            target.symlink_to(os.path.abspath(argv[0]))
        else:  # from source (dev loop): the same module, through a shell line
            pythonpath = os.environ.get("PYTHONPATH", "")
            target.write_text(
                "#!/bin/sh\n"
                f"PYTHONPATH={json.dumps(pythonpath)} exec "
                + " ".join(json.dumps(a) for a in argv)
                + ' "$@"\n'
            )
            target.chmod(0o755)
        for name in ("loopback", "host-local", "host-device", "ptp"):
            (self.bin / name).symlink_to(os.path.join(CNI_BIN, name))

    def nic_pair(self, pci_a: str, name_a: str, pci_b: str, name_b: str) -> Tuple[Nic, Nic]:
        """Two virtio NICs of the node wired to each other (one veth pair)."""
        veth(self.node, name_a, self.node, name_b)
        out = []
        for pci, name in ((pci_a, name_a), (pci_b, name_b)):
            self.fake.add_virtio_nic(pci, name, mac=self.link(name)["address"])
            nic = Nic(pci, name)
            nic.state = self.nic_state(nic)
            self.nics[pci] = nic
            out.append(nic)
        return out[0], out[1]

    def start(self) -> None:
        assert self.ctd is not None
        self.ctd.start()
        self.ctd.import_image(ctd.write_image(self.tmp / "busybox-oci.tar"))

    @property
    def cri(self) -> ctd.Cri:
        assert self.ctd is not None and self.ctd.cri is not None, "containerd is not running"
        return self.ctd.cri

    # -- the network config --------------------------------------------------------------------
    def plugin_conf(self, *, type: str = "ehost-device", **keys: Any) -> Dict[str, Any]:
        conf: Dict[str, Any] = {"type": type}
        conf["ipam"] = {
            "type": "host-local",
            "dataDir": str(self.ipam_dir),
            "ranges": [[{"subnet": SUBNET}]],
        }
        conf.update(keys)
        return conf

    def write_conflist(self, plugin: Dict[str, Any], wait: bool = True) -> None:
        """The node's one conflist, replaced atomically; then wait until containerd uses it."""
        conflist = {"cniVersion": "1.0.0", "name": self.network, "plugins": [plugin]}
        tmp = self.conf_dir / ".10-vcri.tmp"
        tmp.write_text(json.dumps(conflist))
        os.rename(tmp, self.conf_dir / "10-vcri.conflist")
        if wait:
            self.wait_loaded(plugin)

    def write_chain(self, plugins: List[Dict[str, Any]], version: str = "1.0.0") -> None:
        """The node's one conflist with several plugins (e.g. the cluster network, then
        ehost-device chained), replaced atomically; then wait until containerd uses it."""
        conflist = {"cniVersion": version, "name": self.network, "plugins": plugins}
        tmp = self.conf_dir / ".10-vcri.tmp"
        tmp.write_text(json.dumps(conflist))
        os.rename(tmp, self.conf_dir / "10-vcri.conflist")
        deadline = time.monotonic() + 10
        while self.loaded_plugins() != plugins:
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not load the new conflist: {plugins}")
            time.sleep(0.02)

    def wait_loaded(self, plugin: Dict[str, Any], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.loaded_plugin() == plugin:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not load the new conflist: {plugin}")
            time.sleep(0.02)

    def loaded_plugin(self) -> Optional[Dict[str, Any]]:
        """The (first) plugin config containerd's CNI library holds now."""
        plugins = self.loaded_plugins()
        return plugins[0] if plugins else None

    def loaded_plugins(self) -> List[Dict[str, Any]]:
        """The plugin configs of this lab's network that containerd's CNI library holds now."""
        raw = self.cri.network_config()
        if not raw:
            return []
        for net in json.loads(raw).get("Networks") or []:
            conf = net.get("Config") or {}
            if conf.get("Name") != self.network:
                continue
            return [
                json.loads(p["Source"])
                for p in conf.get("Plugins") or []
                if isinstance(p.get("Source"), str)
            ]
        return []

    def use_nic(self, nic: Nic, **keys: Any) -> Dict[str, Any]:
        plugin = self.plugin_conf(deviceID=nic.pci, **keys)
        self.write_conflist(plugin)
        return plugin

    # -- pods ----------------------------------------------------------------------------------
    def sandbox_config(self, name: str) -> Any:
        assert self.ctd is not None
        logs = self.tmp / "pod-logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
            hostname=name,
            log_directory=str(logs),
            linux=api.LinuxPodSandboxConfig(cgroup_parent=self.ctd.cgroup_parent),
        )

    def run_pod(self, nic: Optional[Nic], name: Optional[str] = None, **keys: Any) -> Pod:
        """RunPodSandbox with the conflist naming `nic` (None: keep the current conflist)."""
        if nic is not None:
            self.use_nic(nic, **keys)
        name = name or f"pod-{tag(6)}"
        config = self.sandbox_config(name)
        pod_id = self.cri.run_pod(config)
        self.sandboxes_run += 1
        pod = Pod(name, pod_id, config, nic)
        pod.netns = self.cri.pod_netns(pod_id)
        pod.ip = self.cri.pod_status(pod_id).status.network.ip
        self.pods.append(pod)
        self.all_pods.append(pod)
        return pod

    def stop_pod(self, pod: Pod) -> None:
        self.cri.stop_pod(pod.id)

    def remove_pod(self, pod: Pod) -> None:
        self.cri.remove_pod(pod.id)
        if pod in self.pods:
            self.pods.remove(pod)

    def container(self, pod: Pod, name: str = "box") -> str:
        """A busybox container in the pod (the sandbox image, sleeping)."""
        return self.cri.start_container(pod.id, pod.config, name, ["/bin/sleep", "2147483647"])

    # -- reading -------------------------------------------------------------------------------
    def link(self, name: str, netns: Optional[str] = None) -> Dict[str, Any]:
        if netns is None:
            out = ip("-j", "link", "show", "dev", name, ns=self.node.name).stdout
        else:
            out = ctd_run("nsenter", f"--net={netns}", "ip", "-j", "link", "show", "dev", name)
        return dict(json.loads(out)[0])

    def has_link(self, name: str, netns: Optional[str] = None) -> bool:
        try:
            self.link(name, netns)
            return True
        except Exception:
            return False

    def nic_state(self, nic: Nic) -> Dict[str, Any]:
        link = self.link(nic.name)
        return {
            "name": link["ifname"],
            "mac": link["address"],
            "mtu": link["mtu"],
            "up": "UP" in link["flags"],
            "alias": link.get("ifalias"),
        }

    def home(self, nic: Nic) -> bool:
        """The NIC is on the node under its name, as it was before any pod."""
        return self.has_link(nic.name) and self.nic_state(nic) == nic.state

    def in_pod(self, pod: Pod, nic: Nic) -> bool:
        """`nic` is the pod's eth0, carrying our mark for its PCI address."""
        if not pod.netns or not os.path.exists(pod.netns) or not self.has_link("eth0", pod.netns):
            return False
        alias = self.link("eth0", pod.netns).get("ifalias") or ""
        return alias.startswith(f"virtdp/v1 host={nic.name} pci={nic.pci}")

    def addresses(self, pod: Pod, ifname: str = "eth0") -> List[str]:
        out = ctd_run("nsenter", f"--net={pod.netns}", "ip", "-j", "addr", "show", "dev", ifname)
        return [f"{a['local']}/{a['prefixlen']}" for a in json.loads(out)[0]["addr_info"]]

    def leases(self) -> List[str]:
        d = self.ipam_dir / self.network
        if not d.exists():
            return []
        return sorted(
            p.name for p in d.iterdir() if p.name != "lock" and not p.name.startswith("last_")
        )

    def cni_cache(self) -> List[str]:
        """libcni's result-cache entries of this lab's network, and of the loopback network
        containerd adds to each sandbox this lab ran."""
        if not os.path.isdir(ctd.CNI_RESULTS):
            return []
        loopback = {f"{ctd.LOOPBACK_NETWORK}-{pod.id}-lo" for pod in self.all_pods}
        return sorted(
            n
            for n in os.listdir(ctd.CNI_RESULTS)
            if n.startswith(f"{self.network}-") or n in loopback
        )

    def pod_netns_files(self) -> List[str]:
        d = self.root / "state" / "io.containerd.grpc.v1.cri" / "netns"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def account(self) -> Tuple[int, int]:
        """(NICs not home as they were, leases left): what this run lost."""
        lost = sum(1 for nic in self.nics.values() if not self.home(nic))
        return lost, len(self.leases())

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> List[str]:
        forced: List[str] = []
        errors: List[str] = []
        if self.ctd is not None:
            try:
                forced = self.ctd.close(network=self.network)
            except Exception as e:
                errors.append(str(e))
        if self.executor is not None:  # after containerd: its teardown DELs go through it
            try:
                status = self.executor.stop()
                if status != 0:
                    errors.append(f"executor exited {status} on SIGTERM: {self.executor.log()}")
                if self.sandboxes_run and not self.executor.calls():
                    errors.append(f"the executor served no call: {self.executor.log()}")
            except Exception as e:
                errors.append(str(e))
        for ns in reversed(self.namespaces):
            ns.close()
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))
        return forced


def ctd_run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
