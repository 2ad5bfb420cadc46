"""A private containerd (Debian's 1.6 + runc) for one test, and the CRI client the suite drives it
with: everything it makes lives under the test's tmp dir or is found and removed by `close()`.

containerd runs inside the test's own network namespace (`nsenter --net`, not `ip netns exec`,
which remounts /sys and hides /sys/fs/cgroup), with its root, state, sockets, runc root, CNI
directories and opt dir in the tmp dir (../shared/notes/containerd-cri.md has why each config
key is there). Pods get a `cgroup_parent` below the test process's own memory cgroup.
Two things containerd 1.6 cannot move: shim sockets (`/run/containerd/s/<hash>`) and libcni's
result cache (`/var/lib/cni/results/<network>-<id>-<ifname>`). `close()` removes, in order,
whatever is left of each: sandboxes (CRI Stop+Remove, so CNI DEL runs), containerd, our shims
and the processes in our cgroups, mounts below the tmp dir, the cgroups runc made, our shim
sockets and the result-cache entries of our network and of our sandboxes' loopback. It runs
every step even when one fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import cri_api_pb2 as api
import cri_api_pb2_grpc as api_grpc
import grpc
from processes import start_time

from virtcore.kubelet import channel

K8S_NS = "k8s.io"
SHIM_SOCKET_DIR = "/run/containerd/s"
CNI_RESULTS = "/var/lib/cni/results"
LOOPBACK_NETWORK = "cni-loopback"  # containerd's CRI plugin sets up `lo` through this network
SANDBOX_IMAGE = "localhost/virtdp-test/busybox:1"
BUSYBOX = "/bin/busybox"
RPC_TIMEOUT = 60.0


def missing() -> Optional[str]:
    """Why containerd cannot run here (for a skip), or None."""
    for exe in ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "nsenter"):
        if shutil.which(exe) is None:
            return f"{exe} not found on PATH (Debian: apt-get install containerd runc)"
    if not os.path.isfile(BUSYBOX) or not _is_static(BUSYBOX):
        return f"no static {BUSYBOX} (Debian: apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "containerd needs root"
    return None


def _is_static(path: str) -> bool:
    if shutil.which("file"):
        out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
        return "statically linked" in out or "static-pie" in out
    # `file` missing: a static binary has no PT_INTERP, so no dynamic loader path inside.
    with open(path, "rb") as f:
        return b"/lib64/ld-linux" not in f.read(1 << 20)


# -- the sandbox image ---------------------------------------------------------------------------


def _blob(layout: tarfile.TarFile, data: bytes) -> Dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    layout.addfile(info, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def busybox_layer() -> bytes:
    """One uncompressed layer: the static busybox and a symlink per applet."""
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            t.addfile(info)
        with open(BUSYBOX, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        t.addfile(info, io.BytesIO(data))
        for line in applets.stdout.split():
            name = line.strip("/")
            if not name or name == "bin/busybox" or "/" not in name:
                continue
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/bin/busybox"
            t.addfile(info)
    return buf.getvalue()


def write_image(path: Path, name: str = SANDBOX_IMAGE) -> Path:
    """An OCI image archive of busybox whose entrypoint sleeps forever (a pause container)."""
    layer = busybox_layer()
    with tarfile.open(path, "w") as t:
        layer_desc = dict(_blob(t, layer), mediaType="application/vnd.oci.image.layer.v1.tar")
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin:/sbin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        }
        config_desc = dict(
            _blob(t, json.dumps(config).encode()),
            mediaType="application/vnd.oci.image.config.v1+json",
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = dict(
            _blob(t, json.dumps(manifest).encode()),
            mediaType="application/vnd.oci.image.manifest.v1+json",
            platform={"architecture": "amd64", "os": "linux"},
            annotations={"io.containerd.image.name": name},
        )
        for fname, obj in (
            ("oci-layout", {"imageLayoutVersion": "1.0.0"}),
            ("index.json", {"schemaVersion": 2, "manifests": [manifest_desc]}),
        ):
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


# -- the CRI client ------------------------------------------------------------------------------


class Cri:
    """runtime.v1.RuntimeService on containerd's socket, one deadline per call."""

    def __init__(self, socket_path: str) -> None:
        self.channel = channel.connect(socket_path, timeout=10)
        self.stub = api_grpc.RuntimeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any, timeout: float = RPC_TIMEOUT) -> Any:
        return getattr(self.stub, method)(request, timeout=timeout)

    def version(self) -> Any:
        return self.call("Version", api.VersionRequest(version="v1"))

    def network_config(self) -> str:
        """The CNI config containerd has loaded now (Status verbose info `cniconfig`)."""
        out = self.call("Status", api.StatusRequest(verbose=True))
        return out.info.get("cniconfig", "")

    def run_pod(self, config: Any) -> str:
        return self.call("RunPodSandbox", api.RunPodSandboxRequest(config=config)).pod_sandbox_id

    def stop_pod(self, pod_id: str) -> None:
        self.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self.call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def pod_status(self, pod_id: str) -> Any:
        return self.call(
            "PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
        )

    def pods(self) -> List[Any]:
        return list(self.call("ListPodSandbox", api.ListPodSandboxRequest()).items)

    def pod_netns(self, pod_id: str) -> str:
        """The sandbox's network namespace file, from its runtime spec."""
        info = json.loads(self.pod_status(pod_id).info["info"])
        for ns in info["runtimeSpec"]["linux"]["namespaces"]:
            if ns["type"] == "network":
                return str(ns["path"])
        raise LookupError(f"sandbox {pod_id} has no network namespace in its spec")

    def pod_pid(self, pod_id: str) -> int:
        return int(json.loads(self.pod_status(pod_id).info["info"])["pid"])

    def start_container(self, pod_id: str, sandbox: Any, name: str, command: List[str]) -> str:
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name),
            image=api.ImageSpec(image=SANDBOX_IMAGE),
            command=command,
        )
        cid = self.call(
            "CreateContainer",
            api.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox
            ),
        ).container_id
        self.call("StartContainer", api.StartContainerRequest(container_id=cid))
        return str(cid)

    def exec(self, container_id: str, cmd: List[str], timeout: int = 20) -> Any:
        return self.call(
            "ExecSync",
            api.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout),
            timeout=timeout + 10,
        )


# -- containerd ----------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _own_cgroup(controller: str = "memory") -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _cgroup_mounts() -> List[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
            out.append(parts[1])
    return out


class Containerd:
    """containerd with a private config in `netns` (a path), all its files under `root`."""

    def __init__(
        self, root: Path, netns: str, *, cni_bin: Path, cni_conf: Path, env: Dict[str, str]
    ) -> None:
        self.root = root
        self.netns = netns
        self.cni_bin = cni_bin
        self.cni_conf = cni_conf
        self.env = env
        self.socket = str(root / "containerd.sock")
        self.config = root / "config.toml"
        self.log = root / "containerd.log"
        self.proc: Optional[subprocess.Popen] = None
        self.cri: Optional[Cri] = None
        self.cgroup_parent = f"{_own_cgroup().rstrip('/')}/virtdp-{root.name[-12:]}"
        # Per cgroup hierarchy, the first directory of cgroup_parent that does not exist yet:
        # everything runc makes is at or below it, and only that is ours to remove.
        self._cgroup_tops = self._missing_cgroup_tops()
        self.owner: Dict[str, Any] = {
            "pid": os.getpid(),
            "start": start_time(os.getpid()),
            "cgroup_tops": [str(t) for t in self._cgroup_tops],
            "cgroup_parent": self.cgroup_parent,
            "namespaces": [],
            "network": None,
        }
        self.record()
        self._write_config()

    @classmethod
    def stale(cls, root: Path, owner: Dict[str, Any]) -> Containerd:
        """What a dead test process left under `root`, to be closed without its CRI."""
        c = cls.__new__(cls)
        c.root, c.owner = root, owner
        c.socket = str(root / "containerd.sock")
        c.log = root / "containerd.log"
        c.proc, c.cri = None, None
        c._cgroup_tops = [Path(t) for t in owner.get("cgroup_tops", [])]
        c.cgroup_parent = owner.get("cgroup_parent", "")
        return c

    def record(self, **changes: Any) -> None:
        """Note in `<root>/owner.json` what this run made, for `sweep_stale` should it die."""
        self.owner.update(changes)
        tmp = self.root / f".{OWNER_FILE}.tmp"
        tmp.write_text(json.dumps(self.owner))
        os.replace(tmp, self.root / OWNER_FILE)

    def _cgroup_leaves(self) -> List[Path]:
        """cgroup_parent in every hierarchy: named after our root, so ours alone. Its missing
        ancestors (`_cgroup_tops`) may be shared: in a hierarchy where the test's memory cgroup
        path does not exist, runc makes that path for every suite running at once."""
        if not self.cgroup_parent:
            return []
        return [Path(m) / self.cgroup_parent.lstrip("/") for m in _cgroup_mounts()]

    def _missing_cgroup_tops(self) -> List[Path]:
        tops = []
        parts = [p for p in self.cgroup_parent.split("/") if p]
        for mount in _cgroup_mounts():
            d = Path(mount)
            for part in parts:
                d = d / part
                if not d.exists():
                    tops.append(d)
                    break
        return tops

    def _write_config(self) -> None:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        sections: Dict[str, Dict[str, Any]] = {
            "": {
                "version": 2,
                "root": str(self.root / "root"),
                "state": str(self.root / "state"),
                "disabled_plugins": [
                    "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing",
                ],
            },
            "grpc": {"address": self.socket},
            "ttrpc": {"address": str(self.root / "containerd.sock.ttrpc")},
            "debug": {"level": "info"},
            'plugins."io.containerd.internal.v1.opt"': {"path": str(self.root / "opt")},
            cri: {
                "sandbox_image": SANDBOX_IMAGE,
                "netns_mounts_under_state_dir": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "systemd_cgroup": False,
                "disable_apparmor": True,
                "disable_hugetlb_controller": True,
                "tolerate_missing_hugetlb_controller": True,
                # root here lacks CAP_SYS_RESOURCE: without this runc fails with "can't get
                # final child's PID from pipe: EOF".
                "restrict_oom_score_adj": True,
            },
            f"{cri}.cni": {
                "bin_dir": str(self.cni_bin),
                "conf_dir": str(self.cni_conf),
                "max_conf_num": 1,
            },
            f"{cri}.containerd": {"snapshotter": "overlayfs", "default_runtime_name": "runc"},
            f"{cri}.containerd.runtimes.runc": {"runtime_type": "io.containerd.runc.v2"},
            f"{cri}.containerd.runtimes.runc.options": {
                "SystemdCgroup": False,
                "Root": str(self.root / "runc"),
            },
        }
        lines = []
        for name, keys in sections.items():
            if name:
                lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
        self.config.write_text("\n".join(lines) + "\n")

    # -- running -------------------------------------------------------------------------------
    def start(self) -> Cri:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net={self.netns}", "containerd", "--config", str(self.config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.record(containerd=[self.proc.pid, start_time(self.proc.pid)])
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if os.path.exists(self.socket):
                try:
                    self.cri = Cri(self.socket)
                    self.cri.version()
                    return self.cri
                except (grpc.RpcError, channel.SocketUnavailable):
                    if self.cri is not None:
                        self.cri.close()
                        self.cri = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd not ready after 30s:\n{self.log_tail()}")
            time.sleep(0.05)

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ctr", "--address", self.socket, "-n", K8S_NS, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal containerd (not its shims: they outlive it, as on a node)."""
        if self.cri is not None:
            self.cri.close()
            self.cri = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- what is ours --------------------------------------------------------------------------
    def shims(self) -> List[int]:
        """Our shims: `containerd-shim-runc-v2 ... -address <our socket>`."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or not argv[0].endswith(b"containerd-shim-runc-v2"):
                continue
            if b"-address" in argv and self.socket.encode() in argv:
                pids.append(int(entry))
        return pids

    def shim_socket(self, task_id: str) -> str:
        """Where containerd 1.6 puts the shim socket of a task (runtime/v2/shim SocketAddress)."""
        key = os.path.join(self.socket, K8S_NS, task_id)
        return os.path.join(SHIM_SOCKET_DIR, hashlib.sha256(key.encode()).hexdigest())

    def task_ids(self) -> List[str]:
        d = self.root / "state" / "io.containerd.runtime.v2.task" / K8S_NS
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def cgroup_procs(self) -> List[int]:
        pids = set()
        for top in self._cgroup_leaves():
            if not top.exists():
                continue
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        return sorted(pids)

    def mounts(self) -> List[str]:
        """Mount points below our root, deepest first."""
        root = str(self.root) + "/"
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(root):
                points.append(point)
        return sorted(points, key=lambda p: (p.count("/"), p), reverse=True)

    # -- teardown ------------------------------------------------------------------------------
    def close(self, network: Optional[str] = None, *, graceful: bool = True) -> List[str]:
        """Remove everything; returns what had to be removed by force (empty when the CRI
        teardown left nothing behind). `graceful=False`: no CRI teardown (a dead run's)."""
        forced: List[str] = []
        steps: List[Callable[[], None]] = []

        def step(fn: Callable[[], None]) -> Callable[[], None]:
            steps.append(fn)
            return fn

        @step
        def sandboxes() -> None:
            if not graceful:
                pid, start = self.owner.get("containerd") or (0, None)
                if pid and start and start_time(pid) == start:
                    forced.append(f"containerd pid {pid}")
                    os.kill(pid, signal.SIGKILL)
                return
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            assert self.cri is not None
            failed = []
            for pod in self.cri.pods():
                with contextlib.suppress(grpc.RpcError):
                    self.cri.stop_pod(pod.id)
                try:
                    self.cri.remove_pod(pod.id)
                except grpc.RpcError as e:
                    failed.append(f"{pod.id[:12]}: {e.details()}")
            if failed:  # the forced steps below still remove what these sandboxes hold
                raise RuntimeError(f"RemovePodSandbox failed: {'; '.join(failed)}")

        @step
        def stop_containerd() -> None:
            self.kill(signal.SIGTERM)

        task_ids: List[str] = []

        @step
        def shims_and_processes() -> None:
            task_ids.extend(self.task_ids())
            for pid in self.shims():
                forced.append(f"shim pid {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                pids = self.cgroup_procs()
                if not pids:
                    break
                for pid in pids:
                    forced.append(f"pid {pid} in our cgroups")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)

        @step
        def mounts() -> None:
            for point in self.mounts():
                forced.append(f"mount {point}")
                r = subprocess.run(["umount", point], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True)

        @step
        def cgroups() -> None:
            for leaf in self._cgroup_leaves():
                if not leaf.exists():
                    continue
                dirs = sorted(
                    (p for p in leaf.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
                )
                # runc removes a container's cgroup, never the parent it made for the pod.
                for d in dirs + [leaf]:
                    for _ in range(20):
                        try:
                            d.rmdir()
                            break
                        except FileNotFoundError:
                            break
                        except OSError:
                            time.sleep(0.05)
            # Ancestors runc made for us may hold another suite's cgroups now: removed only when
            # empty (rmdir refuses otherwise), never emptied.
            for top in self._cgroup_tops:
                for leaf in self._cgroup_leaves():
                    if top in leaf.parents:
                        d = leaf.parent
                        while d != top.parent:
                            try:
                                d.rmdir()
                            except OSError:
                                break
                            d = d.parent

        @step
        def shim_sockets() -> None:
            for tid in task_ids:
                sock = Path(self.shim_socket(tid))
                if sock.exists() or sock.is_symlink():
                    forced.append(f"shim socket {sock}")
                    sock.unlink()

        @step
        def cni_cache() -> None:
            # Entries of our network, and of the loopback network the CRI plugin adds to every
            # sandbox (libcni names them `<network>-<sandbox ID>-<ifname>`): a DEL removes them,
            # so only sandboxes that never got one (a run killed mid-test) leave any.
            if not os.path.isdir(CNI_RESULTS):
                return
            ours = {f"{LOOPBACK_NETWORK}-{tid}-lo" for tid in task_ids}
            for name in os.listdir(CNI_RESULTS):
                if name in ours or (network is not None and name.startswith(f"{network}-")):
                    forced.append(f"CNI result cache {name}")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(CNI_RESULTS, name))

        errors = []
        for fn in steps:
            try:
                fn()
            except Exception as e:  # every step runs; the first failures are reported
                errors.append(f"{fn.__name__}: {e!r}")
        if errors:
            raise RuntimeError("containerd teardown: " + "; ".join(errors))
        return forced


OWNER_FILE = "owner.json"
ROOT_PREFIX = "vcri-"


def sweep_stale() -> None:
    """Remove what runs whose test process died without its teardown (SIGKILL, a cancelled
    Pants sandbox) left: their containerd, shims, mounts, cgroups, namespaces, cache entries.
    Runs of live processes (another suite running now) are left alone."""
    for root in Path("/tmp").glob(ROOT_PREFIX + "*"):
        try:
            owner = json.loads((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if start_time(owner["pid"]) == owner["start"]:
            continue
        with contextlib.suppress(Exception):
            Containerd.stale(root, owner).close(owner.get("network"), graceful=False)
        for name in owner.get("namespaces", []):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
