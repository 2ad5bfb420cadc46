"""The shipped image, built and run: `built_image` makes it with deployments/build-image on the
offline Debian base (root filesystem cached between runs in BASE_CACHE), `DaemonSetNode` runs
deployments/virtdp-daemonset.yaml's pod through a private containerd's CRI, with the node's
paths standing in under a temp dir: a fake virtio sysfs, the test kubelet's device-plugin
directory, an empty CNI bin directory. Shared by tests/runtime/test_image.py and
bench/image.py. Everything made here is removed on close: buildah images, containers, the
containerd, namespaces, directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import configmap
import containerd as ctd
import cri_api_pb2 as api
import podspec
import yaml
from fakesysfs import FakeSysfs
from netlab import Netns, http_get, tag, veth
from testkubelet import TestKubelet

BASE_CACHE = Path(os.environ.get("VIRTDP_IMAGE_CACHE", "/var/cache/virtdp-test"))
PEX_FILES = ("virtdp-serve", "virtdp-inspect", "virtdp-discover", "ehost-device")
DAEMONSET = "virtdp-daemonset.yaml"
CONFIG = "virtdp-config.yaml"
NIC_PCI = "0000:00:0a.0"
NIC_NAME = "eth1"
NIC_MAC = "52:54:00:00:0a:01"
EXECUTOR = "ehost-device-executor"

# Run by `DaemonSetNode.on_host` with python3 inside `unshare --mount --propagation private`:
# the node's paths over the machine's, in this private mount namespace only. A node path whose
# directory the machine lacks is made in an overlay of its nearest existing ancestor (the upper
# layer under the test's directory), so nothing is created on the machine itself; mounts below
# that ancestor (/run/netns, ...) are carried over into the overlay.
_HOST_VIEW = r"""
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
def mount(*args):
    subprocess.run(["mount", *args], check=True, capture_output=True)
def points():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]
ancestors = set()
for target, _ in spec["binds"]:
    a = target
    while not os.path.isdir(a):
        a = os.path.dirname(a)
    if a != target:
        assert a != "/", f"would overlay / for {target}"
        ancestors.add(a)
ancestors = {a for a in ancestors if not any(a.startswith(b + "/") for b in ancestors)}
for i, a in enumerate(sorted(ancestors)):
    below = sorted({m for m in points() if m.startswith(a + "/")})
    top = [m for m in below if not any(m.startswith(o + "/") for o in below)]
    staged = []
    for j, m in enumerate(top):
        stage = os.path.join(spec["scratch"], f"stage{i}-{j}")
        os.makedirs(stage) if os.path.isdir(m) else open(stage, "w").close()
        mount("--rbind", m, stage)
        staged.append((stage, m))
    upper, work = (os.path.join(spec["scratch"], f"{k}{i}") for k in ("upper", "work"))
    os.makedirs(upper)
    os.makedirs(work)
    mount("-t", "overlay", "overlay", "-o", f"lowerdir={a},upperdir={upper},workdir={work}", a)
    for stage, m in staged:
        mount("--move", stage, m)
for target, source in spec["binds"]:
    os.makedirs(target, exist_ok=True)
    mount("--bind", source, target)
os.execvp("nsenter", ["nsenter", "--net=" + spec["netns"], "--", *spec["argv"]])
"""

Doc = Dict[str, Any]


def missing(repo_root: Path) -> Optional[str]:
    """Why the image cannot be built and run here (for a skip), or None."""
    for exe, package in (("buildah", "buildah"), ("debootstrap", "debootstrap")):
        if shutil.which(exe) is None:
            return f"{exe} not found on PATH (Debian: apt-get install {package})"
    if pex_dir(repo_root) is None:
        return "no PEX files: run ./pants package tools/:: (or set VIRTDP_PEX_DIR)"
    return ctd.missing()


def pex_dir(repo_root: Path) -> Optional[Path]:
    """Where the four shipped PEX files are: the Pants sandbox (cwd), $VIRTDP_PEX_DIR, dist/."""
    for d in (os.environ.get("VIRTDP_PEX_DIR"), os.getcwd(), str(repo_root / "dist")):
        if d and all(os.path.isfile(os.path.join(d, f"{t}.pex")) for t in PEX_FILES):
            return Path(d)
    return None


def find_repo_root() -> Path:
    # Under Pants the sandbox (cwd) holds deployments/; in a checkout it is two levels up.
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for candidate in (start, *start.parents):
            if (candidate / "deployments" / "build-image").is_file():
                return candidate
    raise RuntimeError("deployments/build-image not found above the working directory")


def manifest(repo_root: Path, name: str) -> List[Doc]:
    text = (repo_root / "deployments" / name).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


@dataclass(frozen=True)
class BuiltImage:
    name: str  # the tag in buildah's store, unique to this build
    archive: Path  # OCI archive of it
    size_bytes: int  # every layer, uncompressed (the base's and ours)
    own_bytes: int  # the layers the Containerfile adds
    seconds: float  # build-image's wall time (base from the cache when it is there)
    revision_label: str


def inspect(name: str) -> Doc:
    """buildah's view of an image: its OCI config (OCIv1) and manifest."""
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", name], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out))


def _layers(name: str) -> List[int]:
    return [int(layer["size"]) for layer in json.loads(inspect(name)["Manifest"])["layers"]]


@contextlib.contextmanager
def built_image(repo_root: Path, work: Path) -> Iterator[BuiltImage]:
    unique = tag(8)
    name = f"localhost/virtdp-test-{unique}:latest"
    base = f"localhost/virtdp-test-base-{unique}:bookworm"
    archive = work / "virtdp-oci.tar"
    dist = pex_dir(repo_root)
    assert dist is not None
    BASE_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [
        "bash",
        str(repo_root / "deployments" / "build-image"),
        "--offline-base",
        "--base-name",
        base,
        "--base-cache",
        str(BASE_CACHE),
        "--dist",
        str(dist),
        "--tag",
        name,
        "--oci-archive",
        str(archive),
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - started
        assert done.returncode == 0, f"build-image failed ({done.returncode}):\n{done.stderr}"
        layers = _layers(name)
        base_layers = _layers(base)
        labels = inspect(name)["OCIv1"]["config"].get("Labels", {})
        yield BuiltImage(
            name=name,
            archive=archive,
            size_bytes=sum(layers),
            own_bytes=sum(layers) - sum(base_layers),
            seconds=seconds,
            revision_label=labels.get("org.opencontainers.image.revision", ""),
        )
    finally:
        for image in (name, base):
            subprocess.run(["buildah", "rmi", "-f", image], capture_output=True, text=True)
        archive.unlink(missing_ok=True)


class DaemonSetNode:
    """A node running the DaemonSet's pod from `image` (an OCI archive) through containerd."""

    def __init__(self, repo_root: Path, image: BuiltImage) -> None:
        self.repo_root = repo_root
        self.image = image
        (self.ds,) = manifest(repo_root, DAEMONSET)
        self.spec: Doc = self.ds["spec"]["template"]["spec"]
        self.image_ref = self.spec["containers"][0]["image"]
        self.stack = contextlib.ExitStack()
        # containerd's and the device plugins' sockets must fit a sun_path: a short root, named
        # like the suite's other containerd roots so that a run killed mid-test is swept by the
        # next one (containerd.sweep_stale, from the owner file containerd.record writes).
        ctd.sweep_stale()
        self.root = Path(tempfile.mkdtemp(prefix=ctd.ROOT_PREFIX, dir="/tmp"))
        self.stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        self.containers_run = 0
        self.attempts: Dict[str, int] = {}
        self.pod_id = ""
        self.ctd: Optional[ctd.Containerd] = None
        self.cri: Any = None
        self.kubelet: Optional[TestKubelet] = None

    # -- the node ------------------------------------------------------------------------------
    def host_path(self, path: str) -> Path:
        """Where a node path of the manifest is on this test node."""
        if path == "/sys":
            return self.fake.root
        return self.root / "host" / path.lstrip("/")

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self.node = Netns("vimg")
        self.stack.callback(self.node.close)
        self.peer = Netns("vimgp")
        self.stack.callback(self.peer.close)
        # The node's spare virtio NIC: a netdev in the node's netns and its PCI tree in sysfs.
        veth(self.node, NIC_NAME, self.peer, "p1", mac=NIC_MAC)
        self.fake = FakeSysfs(self.root / "sys")
        self.fake.add_virtio_nic(NIC_PCI, NIC_NAME, mac=NIC_MAC)
        # The kubelet's device-plugin directory (hostPath type Directory: it must exist).
        plugin_dir = self.host_path("/var/lib/kubelet/device-plugins")
        plugin_dir.mkdir(parents=True)
        self.host_path("/var/lib/kubelet/pod-resources").mkdir(parents=True)
        self.kubelet = TestKubelet(str(plugin_dir))
        self.kubelet.start()
        self.stack.callback(self.kubelet.stop)
        (self.root / "cni-bin").mkdir()
        (self.root / "net.d").mkdir()
        self.ctd = ctd.Containerd(
            self.root,
            self.node.path,
            cni_bin=self.root / "cni-bin",
            cni_conf=self.root / "net.d",
            env={},
        )
        self.ctd.record(namespaces=[self.node.name, self.peer.name])
        self.stack.callback(self.ctd.close)
        self.cri = self.ctd.start()
        self.ctd.import_image(ctd.write_image(self.root / "busybox-oci.tar"))
        self.ctd.import_image(self.image.archive)
        # The image under the DaemonSet's own image reference: imported, never pulled.
        self.ctd.ctr("images", "tag", "--force", self.image.name, self.image_ref)
        config_maps = {
            cm["metadata"]["name"]: cm["data"] for cm in manifest(self.repo_root, CONFIG)
        }
        self.pod = podspec.lay_out(
            self.ds["metadata"]["name"],
            self.spec,
            self.root / "pod",
            host_path=self.host_path,
            config_maps=config_maps,
        )
        self.sandbox = podspec.sandbox_config(
            self.pod,
            uid=str(uuid.uuid4()),
            namespace=self.ds["metadata"]["namespace"],
            cgroup_parent=self.ctd.cgroup_parent,
            log_directory=self.root / "logs",
        )
        self.pod_id = self.cri.run_pod(self.sandbox)

    def close(self) -> None:
        if self.cri is not None and self.pod_id:
            with contextlib.suppress(Exception):
                self.cri.stop_pod(self.pod_id)
                self.cri.remove_pod(self.pod_id)
        self.stack.close()

    # -- containers ----------------------------------------------------------------------------
    def create(self, name: str) -> str:
        c = self.pod.container(name)
        image = c["image"]
        assert image == self.image_ref, f"{name}: image {image}, the others {self.image_ref}"
        attempt = self.attempts.get(name, 0)
        self.attempts[name] = attempt + 1
        config = podspec.container_config(self.pod, c, image=image, attempt=attempt)
        request = api.CreateContainerRequest(
            pod_sandbox_id=self.pod_id, config=config, sandbox_config=self.sandbox
        )
        return str(self.cri.call("CreateContainer", request).container_id)

    def start_container(self, container_id: str) -> None:
        self.cri.call("StartContainer", api.StartContainerRequest(container_id=container_id))
        self.containers_run += 1

    def status(self, container_id: str) -> Any:
        request = api.ContainerStatusRequest(container_id=container_id)
        return self.cri.call("ContainerStatus", request).status

    def wait_exited(self, container_id: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(container_id)
            if st.state == api.CONTAINER_EXITED:
                return st
            assert time.monotonic() < deadline, f"{container_id} still {st.state} after {timeout}s"
            time.sleep(0.1)

    def stop_container(self, container_id: str) -> None:
        grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        self.cri.call(
            "StopContainer",
            api.StopContainerRequest(container_id=container_id, timeout=grace),
            timeout=grace + 30,
        )

    def log(self, name: str) -> str:
        """Every attempt's CRI log of container `name`, oldest first."""
        attempts = sorted((self.root / "logs" / name).glob("*.log"), key=lambda p: int(p.stem))
        return "".join(p.read_text(errors="replace") for p in attempts)

    def exec(self, container_id: str, *cmd: str, timeout: int = 60) -> Tuple[int, str, str]:
        r = self.cri.exec(container_id, list(cmd), timeout=timeout)
        return r.exit_code, r.stdout.decode(), r.stderr.decode()

    def http_get(self, url: str) -> Tuple[int, str]:
        """GET from the node's network namespace (where the kubelet's probes come from)."""
        return http_get(self.node, url)

    def run_init(self, name: str, timeout: float = 120) -> Any:
        """Run init container `name` to its end; its status."""
        cid = self.create(name)
        self.start_container(cid)
        return self.wait_exited(cid, timeout=timeout)

    def run_container(self, name: str) -> str:
        cid = self.create(name)
        self.start_container(cid)
        return cid

    def add_nic(self, pci_address: str, name: str, mac: str) -> None:
        """Another spare virtio NIC of the node: its netdev and its PCI tree in sysfs."""
        veth(self.node, name, self.peer, f"p{tag(6)}", mac=mac)
        self.fake.add_virtio_nic(pci_address, name, mac=mac)

    def edit_config_map(self, volume: str, data: Dict[str, str]) -> bool:
        """Update a configMap volume as the kubelet does after an edit (the `..data` swap)."""
        return configmap.project(self.pod.volumes[volume], data)

    def on_host(
        self, argv: List[str], *, env: Dict[str, str], input: str = "", timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run `argv` as a process on this node's host, as a container runtime runs a CNI
        plugin: in the node's network namespace, seeing the test's stand-in of every host path
        the executor container mounts at its node path (the fake sysfs at /sys)."""
        binds = []
        for m in self.pod.container(EXECUTOR)["volumeMounts"]:
            (volume,) = (v for v in self.spec["volumes"] if v["name"] == m["name"])
            if "hostPath" in volume:
                path = volume["hostPath"]["path"]
                binds.append((os.path.realpath(path), str(self.host_path(path))))
        scratch = Path(tempfile.mkdtemp(prefix="host-view-", dir=self.root))
        spec = {"binds": binds, "scratch": str(scratch), "netns": self.node.path, "argv": argv}
        try:
            return subprocess.run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "python3",
                    "-c",
                    _HOST_VIEW,
                    json.dumps(spec),
                ],
                env=env,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
