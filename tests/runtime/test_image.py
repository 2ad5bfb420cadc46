"""The shipped image, built offline (deployments/build-image on a debootstrap base) and run under
containerd as deployments/virtdp-daemonset.yaml says: the init container installs ehost-device
into the node's CNI bin directory, virtdp-serve reads the node's (fake) sysfs and registers with
the test kubelet, answers its probes and removes its sockets on SIGTERM; virtdp-inspect and
virtdp-discover run in the container by ExecSync. Every CRI config comes from the manifest
(tests/runtime/podspec.py), so a manifest change the image cannot follow fails here."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

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
        for name in ("install-cni", "virtdp-serve"):
            print(f"--- {name} log ---\n" + n.log(name))
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


def test_install_policy_puts_the_node_policy_where_the_plugin_reads_it(
    node: DaemonSetNode,
) -> None:
    cid = node.create("install-policy")
    node.start_container(cid)
    st = node.wait_exited(cid, timeout=60)
    assert st.exit_code == 0, node.log("install-policy")
    installed = node.host_path("/etc/virtdp/ehost-device.yaml")
    assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    (cm,) = (d for d in imagelab.manifest(node.repo_root, "virtdp-config.yaml"))
    assert installed.read_text() == cm["data"]["ehost-device.yaml"]


def test_executor_container_serves_a_cni_add_run_on_the_host(node: DaemonSetNode) -> None:
    """The DaemonSet's ehost-device-executor container serves its socket in the host's
    /run/virtdp; the plugin the init container installed, run on the host as a runtime runs it,
    hands it the call; the NIC goes into the pod and comes back."""
    from netlab import Netns, ip

    for init in ("install-cni", "install-policy"):
        cid = node.create(init)
        node.start_container(cid)
        assert node.wait_exited(cid, timeout=60).exit_code == 0, node.log(init)
    bin_dir = node.host_path("/opt/cni/bin")
    # The IPAM plugin runs in the executor's container, from the request's CNI_PATH: the
    # host's CNI bin directory, which the container mounts at the same path.
    host_local = bin_dir / "host-local"
    host_local.write_bytes(Path("/usr/lib/cni/host-local").read_bytes())
    host_local.chmod(0o755)

    executor = node.create("ehost-device-executor")
    node.start_container(executor)
    sock = node.host_path("/run/virtdp/ehost-device.sock")
    deadline = time.monotonic() + 120
    while True:  # the manifest's readiness probe, run as the kubelet would
        code, _, _ = node.exec(
            executor,
            "/opt/virtdp/ehost-device.pex",
            "probe",
            "--socket",
            "/run/virtdp/ehost-device.sock",
        )
        if code == 0:
            break
        assert time.monotonic() < deadline, node.log("ehost-device-executor")
        time.sleep(0.5)
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600

    pod = Netns("vimgpod")
    try:
        conf = {
            "cniVersion": "1.0.0",
            "name": "virtdp-net",
            "type": "ehost-device",
            "deviceID": NIC_PCI,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.51.100.0/24"}]]},
        }

        def cni(command: str) -> subprocess.CompletedProcess:
            env = {
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": "imagetest",
                "CNI_NETNS": pod.path,
                "CNI_IFNAME": "net1",
                # Paths as the executor's container sees them: the host's CNI bin directory.
                "CNI_PATH": "/opt/cni/bin",
                "EHOST_DEVICE_SOCKET": str(sock),
            }
            return node.node.exec(
                str(bin_dir / "ehost-device"), env=env, input=json.dumps(conf), check=False
            )

        add = cni("ADD")
        assert add.returncode == 0, add.stdout + add.stderr + node.log("ehost-device-executor")
        assert "net1" in pod.links() and NIC_NAME not in node.node.links()
        (addr,) = json.loads(add.stdout)["ips"]
        assert addr["address"].startswith("198.51.100.")
        # The executor did it, not the front itself: its metrics (the manifest's port) count it.
        port = node.pod.container("ehost-device-executor")["ports"][0]["containerPort"]
        code, metrics = node.http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and 'ehost_device_calls_total{command="ADD",result="ok"} 1.0' in metrics
        # host-local's lease is in the host's /var/lib/cni, mounted into the container.
        assert list(node.host_path("/var/lib/cni/networks/virtdp-net").glob("198.51.100.*"))
        delete = cni("DEL")
        assert delete.returncode == 0, delete.stdout + delete.stderr
        assert NIC_NAME in node.node.links() and "net1" not in pod.links()
        assert not list(node.host_path("/var/lib/cni/networks/virtdp-net").glob("198.51.100.*"))
        ip("link", "show", NIC_NAME, ns=node.node.name)
    finally:
        pod.close()
    node.stop_container(executor)
    st = node.wait_exited(executor, timeout=60)
    assert st.exit_code == 0, node.log("ehost-device-executor")
    assert not sock.exists(), "the executor left its socket behind"
