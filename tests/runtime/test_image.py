"""The shipped image, built offline (deployments/build-image on a debootstrap base) and run under
containerd as deployments/virtdp-daemonset.yaml says: the init container installs ehost-device
into the node's CNI bin directory, virtdp-serve reads the node's (fake) sysfs and registers with
the test kubelet, answers its probes and removes its sockets on SIGTERM; virtdp-inspect and
virtdp-discover run in the container by ExecSync. The node policy: every option the ConfigMap
documents, set in turn by an edit of the mounted ConfigMap, reaches the host through policy-sync
and holds for a CNI call run on the host and for one the executor container serves. Every CRI
config comes from the manifest (tests/runtime/podspec.py), so a manifest change the image cannot
follow fails here."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator

import imagelab
import pytest
from imagelab import NIC_NAME, NIC_PCI, BuiltImage, DaemonSetNode
from virtdp_figures import Figures

RESOURCE = "kernel.org/virt"


@pytest.fixture(scope="module")
def repo_root() -> Path:
    return imagelab.find_repo_root()


@pytest.fixture(scope="module")
def image(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    why = imagelab.missing(repo_root)
    if why:
        pytest.skip(f"image test: {why}")
    with imagelab.built_image(repo_root, tmp_path_factory.mktemp("image")) as built:
        yield built


@pytest.fixture
def node(repo_root: Path, image: BuiltImage, figures: Figures) -> Iterator[DaemonSetNode]:
    n = DaemonSetNode(repo_root, image)
    try:
        n.start()
        yield n
    finally:
        figures.add(image_containers=n.containers_run, cri_sandboxes=1 if n.pod_id else 0)
        if n.ctd is not None:
            print("--- containerd log (tail) ---\n" + n.ctd.log_tail())
        for name in ("install-policy", "install-cni", "virtdp-serve", "policy-sync"):
            print(f"--- {name} log ---\n" + n.log(name))
        print(f"--- {imagelab.EXECUTOR} log ---\n" + n.log(imagelab.EXECUTOR))
        n.close()


def test_the_image_carries_its_version_and_revision(image: BuiltImage) -> None:
    config = imagelab.inspect(image.name)["OCIv1"]["config"]
    labels = config["Labels"]
    from virtcore import __version__

    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.revision"], "empty revision label"
    assert "PEX_ROOT=/tmp/pex-root" in config["Env"]
    assert image.own_bytes > 0 and image.size_bytes > image.own_bytes


def test_init_container_installs_ehost_device_into_the_host_cni_bin(
    node: DaemonSetNode, repo_root: Path
) -> None:
    cid = node.create("install-cni")
    node.start_container(cid)
    st = node.wait_exited(cid, timeout=60)
    assert st.exit_code == 0, f"install-cni exited {st.exit_code}: {node.log('install-cni')}"
    init = node.pod.container("install-cni")
    name = init["command"][-1]
    bin_dir = node.host_path("/opt/cni/bin")
    installed = bin_dir / name
    shipped = imagelab.pex_dir(repo_root) / "ehost-device.pex"  # type: ignore[operator]
    # The file the image carried, whole, executable by all, and no temporary file left beside it.
    assert installed.read_bytes() == shipped.read_bytes()
    mode = stat.S_IMODE(installed.stat().st_mode)
    assert mode == 0o755, oct(mode)
    assert sorted(p.name for p in bin_dir.iterdir()) == [name]
    # The runtime execs it on the host with the host's python3 (its shebang), empty environment
    # but for the CNI variables, as containerd's libcni does.
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run(
        [str(installed)], input='{"cniVersion":"1.0.0"}', capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["cniVersion"] == "1.0.0" and "1.0.0" in answer["supportedVersions"]
    # Run again (a DaemonSet rollout): the installed file is current, nothing changes.
    inode = installed.stat().st_ino
    again = node.create("install-cni")
    node.start_container(again)
    assert node.wait_exited(again, timeout=60).exit_code == 0
    assert installed.stat().st_ino == inode


def test_virtdp_serve_registers_answers_its_probes_and_cleans_up(node: DaemonSetNode) -> None:
    assert node.kubelet is not None
    serve = node.pod.container("virtdp-serve")
    cid = node.create("virtdp-serve")
    node.start_container(cid)
    node.kubelet.wait_registered(RESOURCE, timeout=120)
    node.kubelet.wait_health(RESOURCE, {NIC_PCI: "Healthy"}, timeout=30)

    port = serve["ports"][0]["containerPort"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = serve[probe]["httpGet"]["path"]
        url = f"http://127.0.0.1:{port}{path}"
        deadline = time.monotonic() + 30
        while (answer := node.http_get(url))[0] != 200:
            assert time.monotonic() < deadline, f"{probe} {url}: {answer}"
            time.sleep(0.2)

    # The container is what the manifest asks: uid 0, no capabilities, read-only root.
    code, out, err = node.exec(cid, "cat", "/proc/self/status")
    assert code == 0, err
    status = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == "0"
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    code, _, err = node.exec(cid, "touch", "/opt/virtdp/x")
    assert code != 0 and "Read-only file system" in err

    plugin_dir = node.host_path("/var/lib/kubelet/device-plugins")
    sockets = {p.name for p in plugin_dir.iterdir() if stat.S_ISSOCK(p.stat().st_mode)}
    assert len(sockets - {"kubelet.sock"}) == 1, sockets

    node.stop_container(cid)
    st = node.wait_exited(cid, timeout=60)
    assert st.exit_code == 0, f"virtdp-serve exited {st.exit_code}: {node.log('virtdp-serve')}"
    left = {p.name for p in plugin_dir.iterdir() if stat.S_ISSOCK(p.stat().st_mode)}
    assert left == {"kubelet.sock"}, f"sockets left after SIGTERM: {left}"
    logs = [line for line in node.log("virtdp-serve").splitlines() if line.strip()]
    # CRI log lines: "<time> <stream> <tag> <message>"; --log-format json from the manifest.
    messages = [line.split(" ", 3)[3] for line in logs]
    assert messages and all(json.loads(m)["msg"] for m in messages if m.startswith("{"))


def test_inspect_and_discover_run_inside_the_serve_container(node: DaemonSetNode) -> None:
    assert node.kubelet is not None
    cid = node.create("virtdp-serve")
    node.start_container(cid)
    node.kubelet.wait_registered(RESOURCE, timeout=120)

    # Without flags (the manifest mounts every path at the tools' defaults).
    code, out, err = node.exec(cid, "virtdp-inspect", "devices", "-o", "json")
    assert code == 0, err
    (plugin,) = json.loads(out)["plugins"]
    assert plugin["socket"] == "/var/lib/kubelet/device-plugins/kernel.org_virt.sock", out
    assert plugin["status"] == "ok", out
    assert [(d["id"], d["health"]) for d in plugin["devices"]] == [(NIC_PCI, "Healthy")], out

    code, out, err = node.exec(cid, "virtdp-discover", "--sysfs-root", "/host/sys", "-o", "json")
    assert code == 0, err
    found = json.loads(out)
    assert NIC_PCI in json.dumps(found) and NIC_NAME in json.dumps(found), out

    node.stop_container(cid)
    assert node.wait_exited(cid, timeout=60).exit_code == 0


def test_translation_refuses_what_it_cannot_run(repo_root: Path) -> None:
    # The test breaks when the manifest grows a key the CRI translation does not carry.
    import copy

    import podspec

    (ds,) = imagelab.manifest(repo_root, imagelab.DAEMONSET)
    spec = copy.deepcopy(ds["spec"]["template"]["spec"])
    spec["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": ["true"]}}}
    pod = podspec.Pod("virtdp", spec, {}, set())
    with pytest.raises(podspec.Unsupported, match="lifecycle"):
        podspec.container_config(pod, spec["containers"][0], image="x")
    spec["shareProcessNamespace"] = True
    with pytest.raises(podspec.Unsupported, match="shareProcessNamespace"):
        podspec.lay_out("virtdp", spec, Path("/nonexistent"), host_path=Path, config_maps={})


# -- the node policy: every documented option, on the host and through the executor ------------

NIC2_PCI = "0000:00:0b.0"
NIC2_NAME = "eth2"
NIC2_MAC = "52:54:00:00:0b:01"
# NIC 2 in a pool of its own, before the catch-all one (first match wins).
TWO_POOLS = f"""pools:
  - resourceName: kernel.org/virt-b
    selectors: {{pciAddresses: ["{NIC2_PCI}"]}}
  - resourceName: kernel.org/virt
    selectors: {{drivers: [virtio_net]}}
"""
# The same two NICs the other way round, under another key (for poolConfig).
SWAPPED_POOLS = f"""pools:
  - resourceName: kernel.org/virt
    selectors: {{pciAddresses: ["{NIC2_PCI}"]}}
  - resourceName: kernel.org/virt-a
    selectors: {{drivers: [virtio_net]}}
"""
LOG_FILE = "/var/log/virtdp/ehost-device.log"


@dataclass(frozen=True)
class Case:
    """One setting of the ConfigMap's node policy and what each CNI call must then do."""

    name: str
    policy: str
    admitted: str = NIC_PCI  # the NIC an ADD may take
    refused: str = ""  # a NIC an ADD must refuse with 110 ("" = none tried)
    executor: bool = True  # whether calls without EHOST_DEVICE_SOCKET reach the executor
    logs_to_stderr: bool = True  # ADD's info line on the call's stderr
    extra: Dict[str, str] = field(default_factory=dict)  # more ConfigMap keys


CASES = [
    Case("shipped", "logLevel: info\n"),
    Case("logLevel", "logLevel: error\n", logs_to_stderr=False),
    Case("logFile", f"logFile: {LOG_FILE}\n", logs_to_stderr=False),
    Case("sysfsRoot", "sysfsRoot: /sys\n"),
    Case("executorSocket off", "executorSocket: ''\n", executor=False),
    Case("executorSocket", "executorSocket: /run/virtdp/ehost-device.sock\n"),
    Case("allowedPools", "allowedPools: [kernel.org/virt]\n", refused=NIC2_PCI),
    Case(
        "poolConfig",
        "allowedPools: [kernel.org/virt]\npoolConfig: /etc/virtdp/pools.yaml\n",
        admitted=NIC2_PCI,
        refused=NIC_PCI,
        extra={"pools.yaml": SWAPPED_POOLS},
    ),
]


def executor_calls(node: DaemonSetNode, port: int) -> Dict[str, float]:
    """The executor's ehost_device_calls_total by (command, result)."""
    code, text = node.http_get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200, text
    return {
        f"{m.group(1)} {m.group(2)}": float(m.group(3))
        for m in re.finditer(
            r'^ehost_device_calls_total\{command="(\w+)",result="([\w-]+)"\} (\S+)$',
            text,
            re.M,
        )
    }


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> float:
    """Seconds until `check()` holds."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not after {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_every_policy_option_works_on_the_host_and_through_the_executor(
    node: DaemonSetNode,
) -> None:
    """The DaemonSet's pod with each documented option of the ConfigMap's node policy set in
    turn, by an edit of the mounted ConfigMap as the kubelet makes it: policy-sync installs it
    on the host, and a CNI ADD and DEL run through the ehost-device install-cni put on the host,
    once in-process on the host and once handed to the executor container. An edit that does
    not check out is refused, and the installed files stay."""
    from netlab import Netns

    (cm,) = imagelab.manifest(node.repo_root, imagelab.CONFIG)
    data = dict(cm["data"])
    # Init containers in the manifest's order: the policy first, then the plugin.
    for init in [c["name"] for c in node.pod.containers("initContainers")]:
        st = node.run_init(init)
        assert st.exit_code == 0, f"{init} exited {st.exit_code}: {node.log(init)}"
    host_policy = node.host_path("/etc/virtdp/ehost-device.yaml")
    for key, text in data.items():
        installed = node.host_path(f"/etc/virtdp/{key}")
        assert installed.read_text() == text and stat.S_IMODE(installed.stat().st_mode) == 0o644
    bin_dir = node.host_path("/opt/cni/bin")
    # The IPAM plugin runs where the call runs, from CNI_PATH: the host's CNI bin directory,
    # which the executor container mounts at the same path.
    host_local = bin_dir / "host-local"
    host_local.write_bytes(Path("/usr/lib/cni/host-local").read_bytes())
    host_local.chmod(0o755)
    node.add_nic(NIC2_PCI, NIC2_NAME, NIC2_MAC)
    names = {NIC_PCI: NIC_NAME, NIC2_PCI: NIC2_NAME}

    sync = node.run_container("policy-sync")
    executor = node.run_container(imagelab.EXECUTOR)
    probe = node.pod.container(imagelab.EXECUTOR)["readinessProbe"]["exec"]["command"]
    wait_for("executor ready", lambda: node.exec(executor, *probe)[0] == 0, timeout=120)
    sock = node.host_path("/run/virtdp/ehost-device.sock")
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    wait_for("policy-sync watching", lambda: "watching" in node.log("policy-sync"))
    port = node.pod.container(imagelab.EXECUTOR)["ports"][0]["containerPort"]
    leases = node.host_path("/var/lib/cni/networks/virtdp-net")

    pod = Netns("vimgpod")

    def cni(command: str, pci: str, cid: str, in_process: bool) -> subprocess.CompletedProcess:
        conf = {
            "cniVersion": "1.0.0",
            "name": "virtdp-net",
            "type": "ehost-device",
            "deviceID": pci,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.51.100.0/24"}]]},
        }
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "net1",
            "CNI_PATH": "/opt/cni/bin",
        }
        if in_process:
            env["EHOST_DEVICE_SOCKET"] = ""  # the runtime's switch: this call stays on the host
        return node.on_host(["/opt/cni/bin/ehost-device"], env=env, input=json.dumps(conf))

    latencies = []
    try:
        for case in CASES:
            data = {
                **data,
                "config.yaml": TWO_POOLS,
                "ehost-device.yaml": case.policy,
                **case.extra,
            }
            node.edit_config_map("config", data)
            latencies.append(
                wait_for(
                    f"{case.name}: policy on the host",
                    lambda want=case.policy: host_policy.read_text() == want,
                )
            )
            for in_process in (True, False):
                via = "host" if in_process else "executor"
                cid = f"{case.name.replace(' ', '-')}-{via}"
                before = executor_calls(node, port)
                expect_executor = case.executor and not in_process
                add = cni("ADD", case.admitted, cid, in_process)
                what = f"{case.name} via {via}"
                assert add.returncode == 0, f"{what}: {add.stdout}{add.stderr}"
                assert "net1" in pod.links() and names[case.admitted] not in node.node.links()
                assert list(leases.glob("198.51.100.*")), f"{what}: no lease in the host's dir"
                assert (f"ADD {cid}:" in add.stderr) == case.logs_to_stderr, add.stderr
                if case.refused:
                    other = cni("ADD", case.refused, f"{cid}-refused", in_process)
                    assert other.returncode != 0
                    assert json.loads(other.stdout)["code"] == 110, other.stdout
                    assert "allows only" in other.stdout, other.stdout
                    assert names[case.refused] in node.node.links(), f"{what}: NIC moved"
                delete = cni("DEL", case.admitted, cid, in_process)
                assert delete.returncode == 0, f"{what}: {delete.stdout}{delete.stderr}"
                assert names[case.admitted] in node.node.links() and "net1" not in pod.links()
                assert not list(leases.glob("198.51.100.*")), f"{what}: lease left"
                after = executor_calls(node, port)
                served = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                want = {"ADD ok": 1, "DEL ok": 1}
                if case.refused:
                    want["ADD error-110"] = 1
                got = {k: v for k, v in served.items() if v}
                assert got == (want if expect_executor else {}), f"{what}: executor served {got}"
                if case.name == "logFile":
                    log = node.host_path(LOG_FILE).read_text()
                    assert f"ADD {cid}:" in log and f"DEL {cid}:" in log, log

        # An edit that does not check out: refused and logged, the installed files stay.
        good = {p.name: p.read_text() for p in host_policy.parent.iterdir()}
        node.edit_config_map(
            "config", {**data, "ehost-device.yaml": "allowedPools: [kernel.org/nope]\n"}
        )
        wait_for("the refusal", lambda: "refused" in node.log("policy-sync"))
        assert "allowedPools[0]: 'kernel.org/nope' is not a pool" in node.log("policy-sync")
        assert {p.name: p.read_text() for p in host_policy.parent.iterdir()} == good
    finally:
        pod.close()
    # At rest: one process waiting in one blocking read.
    code, status, _ = node.exec(sync, "cat", "/proc/1/status")
    rss = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
    print(
        f"policy-sync at rest: {rss} kB resident; edits reached the host file in "
        f"{max(latencies) * 1000:.0f} ms at most (after the kubelet's update)"
    )
    for name, cid in (("policy-sync", sync), (imagelab.EXECUTOR, executor)):
        node.stop_container(cid)
        st = node.wait_exited(cid, timeout=60)
        assert st.exit_code == 0, f"{name} exited {st.exit_code}: {node.log(name)}"
    assert not sock.exists(), "the executor left its socket behind"
