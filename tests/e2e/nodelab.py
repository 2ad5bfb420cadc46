"""A whole node for the end-to-end suite: 8 virtio-like NICs, virtdp-serve as shipped, the test
kubelet and its pod-resources API, pods, a Multus-like step running ehost-device as shipped,
and the accounting that says nothing was lost.

- The node is a network namespace; each NIC is a veth end in it, mapped to a PCI function by the
  fake sysfs tree (tests/fakesysfs.py). The far ends sit in a "wire" namespace, enslaved to one
  bridge: the NICs share an L2 segment, so two pods can ping each other over theirs, and pulling
  a NIC's cable is downing its far end.
- The kubelet side is tests/testkubelet.py (registration, ListAndWatch, GetPreferredAllocation +
  Allocate on admission) plus tests/testpodresources.py (pod-resources List). Like the kubelet,
  the rig writes its device-manager checkpoint after each admission and reads it back after a
  kubelet restart to restore what was allocated.
- The Multus-like step reads the pod's device IDs from pod-resources `List`, takes them in sorted
  order, injects `deviceID` and `pciBusID` at the top level of the delegate config and runs
  ehost-device (host-local IPAM from /usr/lib/cni, dataDir under the test's tmp_path) the way
  containerd runs a plugin: in the node's namespace, with a bare environment and CNI_ARGS.
- Physical NICs go back to the initial namespace when a namespace dies; veths die with it.
  `kill_pod_namespace` therefore does what the kernel would do for a real NIC (move it back to
  the node under its pod name, or `dev<ifindex>` on a clash) before deleting the namespace.
- The fake sysfs follows the kernel: a NIC's netdev is listed only while it is in the node
  namespace (under its current name), as sysfs mounted there would show.

Every name carries a random tag; everything is removed in `close()`, also after a failure.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fakesysfs import FakeSysfs
from netlab import Netns, ip, tag, veth
from processes import start_time
from testkubelet import TestKubelet
from testpodresources import Container, Pod, PodResourcesServer, checkpoint_json
from toolrun import node_policy, tool_command
from virtdp_figures import Figures

from virtcore import devinfo
from virtcore.kubelet import deviceplugin_pb2, podresources

RES = "kernel.org/virt"
ENV_NAME = "PCIDEVICE_KERNEL_ORG_VIRT"
NIC_COUNT = 8
CNI_BIN = "/usr/lib/cni"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORK = "virtnet"
SUBNET = "198.51.100.0/24"


ROOT_PREFIX = "vde-"
OWNER_FILE = "owner.json"


def sweep_stale() -> None:
    """Remove the namespaces and trees of nodes whose test process died without its teardown
    (SIGKILL, a cancelled Pants sandbox). Nodes of live processes, e.g. a second test run at
    the same time, are left alone."""
    for root in Path("/tmp").glob(ROOT_PREFIX + "*"):
        try:
            owner = json.loads((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if start_time(owner["pid"]) == owner["start"]:
            continue
        serve = owner.get("serve")
        if serve and start_time(serve[0]) == serve[1]:
            os.kill(serve[0], signal.SIGKILL)  # the dead run's own daemon
        for name in owner["namespaces"]:
            ip("netns", "del", name, check=False)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class NicSpec:
    pci_address: str
    host_ifname: str
    mac: str
    numa: int


@dataclass
class Attachment:
    """One CNI attachment the Multus-like step made (or tried to make)."""

    container_id: str
    ifname: str
    device_id: str
    conf: dict
    result: Optional[dict] = None


@dataclass
class PodSandbox:
    name: str
    namespace: str
    uid: str
    netns: Netns
    devices: List[str] = field(default_factory=list)
    attachments: Dict[str, Attachment] = field(default_factory=dict)  # by ifname
    netns_alive: bool = True

    @property
    def owner(self) -> str:
        return f"{self.namespace}/{self.name}/app"


@dataclass
class CniRun:
    rc: int
    out: Optional[dict]
    stdout: str
    stderr: str

    def ok(self) -> dict:
        assert self.rc == 0, f"rc={self.rc} stdout={self.stdout!r} stderr={self.stderr[-3000:]}"
        return self.out or {}


def _cni_env(
    command: str,
    container_id: str,
    netns_path: str,
    ifname: str,
    pod: Optional[PodSandbox],
    cni_path: str,
    extra: Optional[Dict[str, str]] = None,
) -> Dict[str, str]:
    env = {
        "PATH": PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
    }
    if pod is not None:
        # What containerd's CRI plugin sends.
        env["CNI_ARGS"] = (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={pod.uid}"
        )
    argv = tool_command("ehost-device")
    if not argv[0].endswith(".pex") and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(extra or {})
    return env


def parse_cni(proc: subprocess.CompletedProcess) -> CniRun:
    out = None
    if proc.stdout.strip():
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            out = None
    return CniRun(proc.returncode, out, proc.stdout, proc.stderr)


class Node:
    """One node; always `close()` it (a failed build cleans up after itself)."""

    def __init__(self, tmp_path: Path, figures: Figures, *, nics: int = NIC_COUNT) -> None:
        try:
            self._build(tmp_path, figures, nics)
        except BaseException:
            self.close()
            raise

    def _build(self, tmp_path: Path, figures: Figures, nics: int) -> None:
        self.figures = figures
        # How the plugin runs: in-process unless a test points it at an executor's socket
        # (never the node default /run/virtdp/ehost-device.sock).
        self.plugin_env: Dict[str, str] = {"EHOST_DEVICE_SOCKET": ""}
        sweep_stale()
        # Unix socket paths are limited to 107 bytes: keep the tree short, not under tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))
        self.namespaces: List[Netns] = []
        self._owner_lock = threading.Lock()  # pods are made from several threads at once
        self._write_owner()
        self.tmp = tmp_path
        self.dp_dir = self.root / "dp"
        self.devinfo_dir = self.root / "devinfo"
        self.pr_socket = str(self.root / "pr.sock")
        self.ipam_dir = tmp_path / "ipam"
        self.cni_bin = tmp_path / "cni-bin"  # wrappers of the real plugins, for fault injection
        self.sysfs = FakeSysfs(self.root / "sys")
        self.policy_env = node_policy(self.root / "ehost-device.yaml", str(self.sysfs.root))
        self.dp_dir.mkdir()
        self.serve_log = self.root / "serve.log"
        self.node = self._netns("ven")
        self.wire = self._netns("vew")
        ip("link", "add", "br0", "type", "bridge", ns=self.wire.name)
        ip("link", "set", "br0", "up", ns=self.wire.name)
        # A random PCI domain: `virtdp-inspect netns` reads every namespace on the machine, and
        # other tests plumb NICs too.
        dom = f"{random.randint(0x1000, 0xFFFF):04x}"
        self.nics: Dict[str, NicSpec] = {}
        for i in range(nics):
            pci = f"{dom}:00:{0x0A + i:02x}.0"
            name = f"ens{10 + i}"
            veth(self.node, name, self.wire, "w" + name)
            ip("link", "set", "w" + name, "master", "br0", ns=self.wire.name)
            mac = self._link(self.node, name)["address"]
            numa = i % 2
            self.sysfs.add_virtio_nic(pci, name, mac=mac, numa_node=numa)
            self.nics[pci] = NicSpec(pci, name, mac, numa)
        self.by_mac = {n.mac: n for n in self.nics.values()}
        self.kubelet = TestKubelet(str(self.dp_dir))
        self.podres = PodResourcesServer(
            self.pr_socket,
            allocatable={
                RES: {
                    n.numa: [p for p in self.nics if self.nics[p].numa == n.numa]
                    for n in self.nics.values()
                }
            },
        )
        self.pods: Dict[str, PodSandbox] = {}
        self.serve: Optional[subprocess.Popen] = None
        self.admission = threading.Lock()  # the kubelet admits one pod at a time
        self._sysfs_lock = threading.Lock()
        self.devinfo_expected: set = set()  # devices whose device-info file must be there
        self.devinfo_current: set = set()  # ... written by the daemon running now
        self.pulled: set = set()  # PCI addresses whose cable is pulled

    def _netns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self.namespaces.append(ns)
        self._write_owner()
        return ns

    def _write_owner(self) -> None:
        """Who owns this node, for `sweep_stale` after a run killed before its teardown."""
        with self._owner_lock:
            self._write_owner_locked()

    def _write_owner_locked(self) -> None:
        serve = getattr(self, "serve", None)
        tmp = self.root / ".owner.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "start": start_time(os.getpid()),
                    "namespaces": [ns.name for ns in self.namespaces],
                    "serve": [serve.pid, start_time(serve.pid)] if serve else None,
                }
            )
        )
        os.replace(tmp, self.root / OWNER_FILE)

    @staticmethod
    def _link(ns: Netns, name: str) -> dict:
        return json.loads(ip("-j", "link", "show", "dev", name, ns=ns.name).stdout)[0]

    # -- bringing the node up --------------------------------------------------------------
    def start(self) -> None:
        """Kubelet, pod-resources API and virtdp-serve; waits until all 8 NICs are Healthy."""
        self.kubelet.start()
        self.podres.start()
        self.start_serve()
        self.wait_advertised()

    def start_serve(self) -> subprocess.Popen:
        log = open(self.serve_log, "ab")
        cmd = [
            "ip",
            "netns",
            "exec",
            self.node.name,
            *tool_command("virtdp-serve"),
            "--device-plugin-dir",
            str(self.dp_dir),
            "--devinfo-dir",
            str(self.devinfo_dir),
            "--sysfs-root",
            str(self.sysfs.root),
        ]
        self.serve = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        self._write_owner()
        self.devinfo_current = set()
        return self.serve

    def stop_serve(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.serve is not None
        self.serve.send_signal(sig)
        try:
            rc = self.serve.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.serve.kill()
            self.serve.wait()
            raise AssertionError(f"virtdp-serve ignored signal {sig} for {timeout}s") from None
        self.serve = None
        if sig != signal.SIGKILL:
            # A daemon that stops removes the device-info files it wrote (and only those).
            left = [d for d in self.devinfo_current if devinfo.load(str(self.devinfo_dir), RES, d)]
            assert not left, f"device-info files left after a clean stop: {left}"
            self.devinfo_expected -= self.devinfo_current
            self.devinfo_current = set()
        return rc

    def serve_log_text(self) -> str:
        return self.serve_log.read_text() if self.serve_log.exists() else ""

    def expected_health(self) -> Dict[str, str]:
        """What the plugin must advertise: a pulled cable on a NIC in the node is Unhealthy;
        a NIC inside a pod keeps its health (Healthy here: pulled only after plumbing)."""
        out = {}
        for pci, nic in self.nics.items():
            at_node = self._where(nic)[0] == self.node.name
            out[pci] = "Unhealthy" if (pci in self.pulled and at_node) else "Healthy"
        return out

    def wait_advertised(self, timeout: float = 20) -> None:
        self.kubelet.wait_registered(RES, timeout=timeout)
        self.kubelet.wait_health(RES, self.expected_health(), timeout=timeout)

    # -- pods --------------------------------------------------------------------------------
    def new_pod(self, name: Optional[str] = None) -> PodSandbox:
        name = name or f"pod-{tag(6)}"
        pod = PodSandbox(name, "default", f"uid-{tag(8)}", self._netns("vep"))
        self.pods[name] = pod
        return pod

    def admit(self, pod: PodSandbox, count: int = 1) -> List[str]:
        """The kubelet admits the pod: GetPreferredAllocation + Allocate, then its checkpoint and
        pod-resources reflect the allocation."""
        with self.admission:
            ids, resp = self.kubelet.allocate(RES, count, owner=pod.owner)
            assert set(resp.envs) == {ENV_NAME}, resp
            assert sorted(resp.envs[ENV_NAME].split(",")) == sorted(ids), resp
            pod.devices = list(ids)
            self.devinfo_expected |= set(ids)
            self.devinfo_current |= set(ids)
            self._publish()
        return ids

    def release(self, pod: PodSandbox) -> None:
        """The pod is gone: the kubelet frees its devices."""
        with self.admission:
            self.kubelet.release(RES, pod.owner)
            pod.devices = []
            self._publish()

    def _pods_model(self) -> List[Pod]:
        out = []
        for pod in self.pods.values():
            if not pod.devices:
                continue
            by_numa: Dict[int, List[str]] = {}
            for d in pod.devices:
                by_numa.setdefault(self.nics[d].numa, []).append(d)
            out.append(Pod(pod.name, pod.namespace, pod.uid, [Container("app", {RES: by_numa})]))
        return out

    def _publish(self) -> None:
        model = self._pods_model()
        with self.podres.lock:
            self.podres.pods = model
        registered = {RES: {0: sorted(self.nics)}}
        tmp = self.dp_dir / ".checkpoint.tmp"
        tmp.write_text(checkpoint_json(model, registered))
        os.replace(tmp, self.dp_dir / "kubelet_internal_checkpoint")

    def restart_kubelet(self) -> None:
        """The kubelet restarts: sockets deleted, kubelet.sock recreated; like the kubelet, it
        reads its checkpoint to restore what it had allocated."""
        with self.admission:
            before = len(self.kubelet.registrations)
            self.kubelet.restart()
            doc = json.loads((self.dp_dir / "kubelet_internal_checkpoint").read_text())
            for entry in doc["Data"]["PodDeviceEntries"] or []:
                pod = next(p for p in self.pods.values() if p.uid == entry["PodUID"])
                resp = deviceplugin_pb2.ContainerAllocateResponse.FromString(
                    base64.b64decode(entry["AllocResp"])
                )
                ids = [i for _, v in sorted(entry["DeviceIDs"].items()) for i in v]
                assert sorted(resp.envs[ENV_NAME].split(",")) == sorted(ids)
                for d in ids:
                    self.kubelet.allocated.setdefault(entry["ResourceName"], {})[d] = pod.owner
        self.kubelet.wait(
            lambda: len(self.kubelet.registrations) > before, 10, "re-registration after restart"
        )
        self.wait_advertised()

    # -- the Multus-like step ----------------------------------------------------------------
    def pod_device_ids(self, pod: PodSandbox) -> List[str]:
        """As Multus does: the pod's devices of the resource, from pod-resources List, sorted."""
        with podresources.Client(self.pr_socket, timeout=5) as client:
            listed = client.list()
        ids = [
            dev_id
            for p in listed
            if p.name == pod.name and p.namespace == pod.namespace
            for c in p.containers
            for group in c.devices
            if group.resource_name == RES
            for dev_id in group.device_ids
        ]
        return sorted(ids)

    def delegate(self, **over) -> dict:  # type: ignore[no-untyped-def]
        conf = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "ehost-device",
            "ipam": {
                "type": "host-local",
                "dataDir": str(self.ipam_dir),
                "ranges": [[{"subnet": SUBNET, "rangeStart": "198.51.100.10"}]],
            },
        }
        conf.update(over)
        return conf

    def cni(
        self,
        command: str,
        conf: dict,
        *,
        container_id: str,
        netns_path: str,
        ifname: str = "net1",
        pod: Optional[PodSandbox] = None,
        cni_path: str = CNI_BIN,
        extra_env: Optional[Dict[str, str]] = None,
        background: bool = False,
        timeout: float = 60,
    ):  # type: ignore[no-untyped-def]
        extra = {**self.policy_env, **self.plugin_env, **(extra_env or {})}
        env = _cni_env(command, container_id, netns_path, ifname, pod, cni_path, extra)
        cmd = ["ip", "netns", "exec", self.node.name, *tool_command("ehost-device")]
        if background:  # its own process group: the test may kill it with its children
            conf_file = self.tmp / f"conf-{tag(8)}.json"
            conf_file.write_text(json.dumps(conf))
            with open(conf_file) as stdin:
                return subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
        done = subprocess.run(
            cmd, env=env, input=json.dumps(conf), capture_output=True, text=True, timeout=timeout
        )
        return parse_cni(done)

    def attach(
        self,
        pod: PodSandbox,
        ifname: str = "net1",
        *,
        index: int = 0,
        container_id: Optional[str] = None,
        **over,  # type: ignore[no-untyped-def]
    ) -> CniRun:
        """Multus: look the device up, inject it, ADD. Records the attachment either way."""
        ids = self.pod_device_ids(pod)
        assert len(ids) > index, f"pod-resources lists {ids} for {pod.name}"
        device_id = ids[index]
        conf = self.delegate(deviceID=device_id, pciBusID=device_id, **over)
        cid = container_id or f"ctr{tag(10)}"
        att = Attachment(cid, ifname, device_id, conf)
        pod.attachments[ifname] = att
        run = self.cni(
            "ADD", conf, container_id=cid, netns_path=pod.netns.path, ifname=ifname, pod=pod
        )
        if run.rc == 0:
            att.result = run.out
        self.sync_sysfs()
        return run

    def detach(self, pod: PodSandbox, ifname: str = "net1", *, forget: bool = True) -> CniRun:
        att = pod.attachments[ifname]
        conf = dict(att.conf)
        if att.result is not None:
            conf["prevResult"] = att.result
        run = self.cni(
            "DEL",
            conf,
            container_id=att.container_id,
            netns_path=pod.netns.path,
            ifname=ifname,
            pod=pod,
        )
        if run.rc == 0 and forget:
            del pod.attachments[ifname]
        self.sync_sysfs()
        return run

    def remove_pod(self, pod: PodSandbox) -> None:
        """DEL every attachment, free the devices, delete the sandbox."""
        for ifname in list(pod.attachments):
            self.detach(pod, ifname).ok()
        self.release(pod)
        pod.netns.close()
        pod.netns_alive = False
        del self.pods[pod.name]

    def kill_pod_namespace(self, pod: PodSandbox) -> Dict[str, str]:
        """The pod's namespace dies before its DEL. For each NIC inside, what the kernel does
        with a physical NIC: back to the node namespace under the same name, or `dev<ifindex>`
        when the name is taken. Returns {pci address: name it came back as}."""
        back = {}
        node_names = {link["ifname"] for link in self._links(self.node)}
        for link in self._links(pod.netns):
            spec = self.by_mac.get(link["address"])
            if spec is None:
                continue
            name = link["ifname"]
            if name in node_names:
                name = f"dev{link['ifindex']}"
            ip("link", "set", link["ifname"], "down", ns=pod.netns.name)
            if name != link["ifname"]:  # the kernel renames on the way, never clashes
                ip("link", "set", link["ifname"], "name", name, ns=pod.netns.name)
            ip("link", "set", name, "netns", self.node.name, ns=pod.netns.name)
            node_names.add(name)
            back[spec.pci_address] = name
        pod.netns.close()
        pod.netns_alive = False
        self.sync_sysfs()
        return back

    # -- faults on the wire ------------------------------------------------------------------
    def cable(self, pci: str, plugged: bool) -> None:
        name = "w" + self.nics[pci].host_ifname
        ip("link", "set", name, "up" if plugged else "down", ns=self.wire.name)
        (self.pulled.discard if plugged else self.pulled.add)(pci)

    # -- what the kernel says ------------------------------------------------------------------
    @staticmethod
    def _links(ns: Netns) -> List[dict]:
        return json.loads(ip("-j", "link", "show", ns=ns.name).stdout)

    def _where(self, nic: NicSpec) -> Tuple[Optional[str], Optional[dict]]:
        """(namespace name, link) holding the NIC, found by its MAC, or (None, None)."""
        for ns in [self.node] + [p.netns for p in self.pods.values() if p.netns_alive]:
            for link in self._links(ns):
                if link.get("address") == nic.mac:
                    return ns.name, link
        return None, None

    def sync_sysfs(self) -> None:
        """Make the fake tree list each NIC's netdev exactly while it is in the node namespace."""
        with self._sysfs_lock:
            here = {link["address"]: link["ifname"] for link in self._links(self.node)}
            for pci, nic in self.nics.items():
                listed = [p.name for p in (self.sysfs.function_dir(pci)).glob("virtio*/net/*")]
                name = here.get(nic.mac)
                if name is None and listed:
                    self.sysfs.move_netdev_away(pci)
                elif name is not None and listed != [name]:
                    self.sysfs.move_netdev_away(pci)
                    self.sysfs.add_netdev(pci, name, mac=nic.mac)
                    # On a node the kernel's own sysfs changes with the link event; here the
                    # fake tree changes after it. A real uevent of the netdev then tells
                    # virtdp-serve (event-driven) to read the function again, as on a node.
                    self.node.exec("sh", "-c", f"echo change > /sys/class/net/{name}/uevent")

    def leases(self) -> Dict[str, str]:
        """host-local's leases of the network: address -> container ID."""
        d = self.ipam_dir / NETWORK
        if not d.is_dir():
            return {}
        out = {}
        for p in d.iterdir():
            if p.name == "lock" or p.name.startswith("last_reserved_ip"):
                continue
            out[p.name] = p.read_text().splitlines()[0].strip()
        return out

    def account(self) -> None:
        """After every step and fault: every NIC where it belongs, under the right name and
        state; no lease without a live attachment; device-info files consistent. Losses and
        leaks are added to the figures before the assertion fails."""
        expected: Dict[str, Tuple[str, str]] = {
            pci: (self.node.name, nic.host_ifname) for pci, nic in self.nics.items()
        }
        live_ids = set()
        for pod in self.pods.values():
            for att in pod.attachments.values():
                if att.result is not None and pod.netns_alive:
                    expected[att.device_id] = (pod.netns.name, att.ifname)
                    live_ids.add(att.container_id)
        lost = []
        for pci, nic in self.nics.items():
            ns_name, link = self._where(nic)
            want_ns, want_name = expected[pci]
            if link is None or (ns_name, link["ifname"]) != (want_ns, want_name):
                got = f"{ns_name}/{link['ifname']}" if link else "nowhere"
                lost.append(f"{pci} ({nic.host_ifname}) is {got}, expected {want_ns}/{want_name}")
                continue
            alias = link.get("ifalias")
            if want_ns == self.node.name:
                if alias or "UP" not in link["flags"]:
                    lost.append(f"{pci} back in the node but alias={alias!r} flags={link['flags']}")
            elif not (alias or "").startswith(f"virtdp/v1 host={nic.host_ifname} pci={pci}"):
                lost.append(f"{pci} in {ns_name} without its mark: alias={alias!r}")
        leaked = sorted(f"{a} ({c})" for a, c in self.leases().items() if c not in live_ids)
        self.figures.add(nics_lost=len(lost), leases_leaked=len(leaked))
        assert not lost, f"NICs not where they belong: {lost}"
        assert not leaked, f"IPAM leases without a live attachment: {leaked}"
        self.check_devinfo()

    def check_devinfo(self) -> None:
        present = {}
        for p in self.devinfo_dir.glob("*-device.json") if self.devinfo_dir.is_dir() else []:
            doc = json.loads(p.read_text())
            assert doc == {
                "type": "pci",
                "version": "1.1.0",
                "pci": {"pci-address": doc["pci"]["pci-address"]},
            }, doc
            assert p.stat().st_mode & 0o777 == 0o444, (p, oct(p.stat().st_mode))
            dev = doc["pci"]["pci-address"]
            assert p.name == f"kernel.org-virt-{dev}-device.json", p.name
            assert dev in self.nics, f"device-info for a device not on this node: {p}"
            present[dev] = p
        missing = self.devinfo_expected - set(present)
        assert not missing, f"allocated devices without their device-info file: {missing}"

    def netns_addresses(self, ns: Netns, ifname: str) -> List[str]:
        out = json.loads(ip("-j", "addr", "show", "dev", ifname, ns=ns.name).stdout)
        return [
            f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"] if a["family"] == "inet"
        ]

    def ping(self, src: PodSandbox, address: str) -> subprocess.CompletedProcess:
        return src.netns.exec("ping", "-c", "1", "-W", "2", address.split("/")[0], check=False)

    def wait_kernel(self, pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "serve", None) is not None:
            assert self.serve is not None
            self.serve.kill()
            self.serve.wait()
            self.serve = None
        for closer in (getattr(self, "kubelet", None), getattr(self, "podres", None)):
            if closer is not None:
                try:
                    closer.stop()
                except Exception:  # teardown must go on
                    pass
        for ns in reversed(getattr(self, "namespaces", [])):
            ns.close()
        if getattr(self, "root", None) is not None:
            shutil.rmtree(self.root, ignore_errors=True)
