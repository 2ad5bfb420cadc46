"""The DaemonSet agrees with the real tools: its flags parse with virtdp-serve's own command
line, its mount paths are the tools' defaults, and its exact arguments start a daemon that
answers the liveness and readiness probes and registers with a kubelet."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
import typer
import yaml
from netlab import Netns, http_get, veth
from toolrun import node_policy, tool_command

from virtcore import checkpoint, devinfo
from virtcore.kubelet import deviceplugin_pb2, deviceplugin_pb2_grpc, podresources, registration

Doc = Dict[str, Any]


def load(deployments: Path, name: str) -> List[Doc]:
    return [d for d in yaml.safe_load_all((deployments / name).read_text()) if d]


def pod_spec(deployments: Path) -> Doc:
    (ds,) = load(deployments, "virtdp-daemonset.yaml")
    return ds["spec"]["template"]["spec"]


def serve_container(deployments: Path) -> Doc:
    (c,) = (c for c in pod_spec(deployments)["containers"] if c["name"] == "virtdp-serve")
    return c


def serve_command() -> Any:
    """The click command typer builds (typer >= 0.20 vendors its own click)."""
    from virtdp_serve import cli

    return typer.main.get_command(cli.app)


def options(cmd: Any) -> Dict[str, Any]:
    """`--flag` → its click option, for every option of `cmd`."""
    return {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}


def flag_values(args: List[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    it = iter(args)
    for a in it:
        assert a.startswith("--"), f"DaemonSet arg {a!r}: expected --flag VALUE pairs"
        out[a] = next(it)
    return out


def mount_for(deployments: Path, container: Doc, path: str) -> Tuple[Doc, Doc]:
    """The container's mount at exactly `path` and the volume behind it."""
    volumes = {v["name"]: v for v in pod_spec(deployments)["volumes"]}
    found = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    assert found, f"container {container['name']}: nothing mounted at {path}"
    return found[0], volumes[found[0]["name"]]


def test_daemonset_args_parse_with_the_real_cli(deployments: Path, fake_sysfs) -> None:
    from virtdp_serve import metrics

    c = serve_container(deployments)
    cmd = serve_command()
    # make_context parses and converts every value (choices, paths, counts) without running.
    # --sysfs-root must name a sysfs tree: the node's /host/sys is not here (the mount test
    # below checks that path), a fake tree stands in for it.
    args = list(c["args"])
    args[args.index("--sysfs-root") + 1] = str(fake_sysfs.root)
    ctx = cmd.make_context("virtdp-serve", args)
    assert ctx.params["log_format"].value == "json"
    host, port = metrics.parse_address(ctx.params["metrics_address"])
    assert host in ("0.0.0.0", "::"), "the kubelet probes the node's address: listen on all"
    (declared,) = c["ports"]
    assert port == declared["containerPort"]
    with pytest.raises(Exception, match="No such option"):
        cmd.make_context("virtdp-serve", ["--no-such-flag", "x"])


def test_mount_paths_are_the_tools_defaults(deployments: Path) -> None:
    c = serve_container(deployments)
    given = flag_values(c["args"])
    serve = options(serve_command())
    for flag, lib_default in (
        ("--device-plugin-dir", registration.DEFAULT_DEVICE_PLUGIN_DIR),
        ("--devinfo-dir", devinfo.DEFAULT_DIR),
    ):
        assert str(serve[flag].default) == lib_default
        assert given[flag] == lib_default, f"{flag}: the DaemonSet should pass the default"
        mount, volume = mount_for(deployments, c, lib_default)
        assert volume["hostPath"]["path"] == lib_default, f"{flag}: host path differs"
        assert not mount.get("readOnly"), f"{flag}: virtdp-serve writes there"

    mount, volume = mount_for(deployments, c, given["--sysfs-root"])
    assert volume["hostPath"]["path"] == "/sys" and mount["readOnly"] is True

    config_dir, config_name = os.path.split(given["--config"])
    mount, volume = mount_for(deployments, c, config_dir)
    (cm,) = load(deployments, "virtdp-config.yaml")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert config_name in cm["data"]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap edits"


def test_inspect_defaults_are_mounted_in_the_serve_container(deployments: Path) -> None:
    # `kubectl exec ... -- virtdp-inspect devices|allocations|checkpoint` needs no flags.
    from virtdp_inspect import cli

    group: Any = typer.main.get_command(cli.app)
    c = serve_container(deployments)
    wanted = {
        "--pod-resources-socket": podresources.DEFAULT_SOCKET,
        "--checkpoint": checkpoint.DEFAULT_PATH,
        "--device-plugin-dir": registration.DEFAULT_DEVICE_PLUGIN_DIR,
    }
    seen = set()
    for name, sub in group.commands.items():
        for flag, opt in options(sub).items():
            if flag not in wanted or opt.default is None:
                continue
            seen.add(flag)
            default = str(opt.default)
            assert default == wanted[flag], f"virtdp-inspect {name} {flag}"
            directory = default if flag == "--device-plugin-dir" else os.path.dirname(default)
            _, volume = mount_for(deployments, c, directory)
            assert volume["hostPath"]["path"] == directory
    assert seen == set(wanted)


def test_debug_pod_mounts_what_inspect_reads_by_default(deployments: Path) -> None:
    from virtcore import plumbed
    from virtdp_inspect import cli

    (pod,) = load(deployments, "debug/virtdp-debug.yaml")
    spec = pod["spec"]
    assert spec["hostPID"] is True, "plumbed.scan reads /proc/<pid>/ns/net of the host"
    assert spec["hostNetwork"] is True, "discovery reads the host namespace's links"
    (c,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    group: Any = typer.main.get_command(cli.app)
    defaults = {
        str(opt.default)
        for sub in group.commands.values()
        for flag, opt in options(sub).items()
        if flag in ("--netns-dir", "--device-plugin-dir") and opt.default is not None
    }
    defaults |= {os.path.dirname(podresources.DEFAULT_SOCKET), plumbed.NETNS_DIR}
    for path in defaults:
        assert path in mounts, f"debug pod: {path} not mounted"
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts[plumbed.NETNS_DIR]["mountPropagation"] == "HostToContainer"
    assert c["securityContext"]["privileged"] is True, "entering a netns needs CAP_SYS_ADMIN"


def test_shipped_serve_help_lists_every_flag_the_daemonset_passes(deployments: Path) -> None:
    p = subprocess.run(
        [*tool_command("virtdp-serve"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    for flag in flag_values(serve_container(deployments)["args"]):
        assert flag in p.stdout, f"virtdp-serve --help does not list {flag}"


# -- the DaemonSet's own arguments, run ---------------------------------------------------------


class FakeKubelet(deviceplugin_pb2_grpc.RegistrationServicer):
    """The kubelet's Registration service on `<dir>/kubelet.sock`, dialling the plugin back
    before it answers, as the kubelet does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: List[deviceplugin_pb2.RegisterRequest] = []
        self.registered = threading.Event()

    def Register(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC names)
        sock = self.directory / request.endpoint
        with grpc.insecure_channel(f"unix://{sock}") as chan:
            stub = deviceplugin_pb2_grpc.DevicePluginStub(chan)
            stub.GetDevicePluginOptions(deviceplugin_pb2.Empty(), timeout=5)
        self.requests.append(request)
        self.registered.set()
        return deviceplugin_pb2.Empty()


@pytest.fixture
def kubelet() -> Iterator[Tuple[Path, FakeKubelet]]:
    # A short root: unix socket paths stop at 107 bytes, pytest's tmp_path can be longer.
    root = Path(tempfile.mkdtemp(prefix="vdp-", dir="/tmp"))
    directory = root / registration.DEFAULT_DEVICE_PLUGIN_DIR.lstrip("/")
    directory.mkdir(parents=True)
    servicer = FakeKubelet(directory)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    deviceplugin_pb2_grpc.add_RegistrationServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{directory / registration.KUBELET_SOCKET_NAME}")
    server.start()
    try:
        yield root, servicer
    finally:
        server.stop(grace=None)
        shutil.rmtree(root, ignore_errors=True)


def wait_for(ns: Netns, url: str, status: int, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last: Tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"virtdp-serve exited with {proc.returncode}"
        last = http_get(ns, url)
        if last[0] == status:
            return last[1]
        time.sleep(0.2)
    raise AssertionError(f"{url}: wanted {status}, last answer {last}")


def test_daemonset_args_start_the_daemon_and_answer_the_probes(
    deployments: Path, kubelet: Tuple[Path, FakeKubelet], fake_sysfs: Any
) -> None:
    root, fake_kubelet = kubelet
    c = serve_container(deployments)
    spec = pod_spec(deployments)
    volumes = {v["name"]: v for v in spec["volumes"]}
    # Lay out what the container sees under `root`: the ConfigMap's files, the host's sysfs (a
    # fake virtio tree), empty host directories; then run the DaemonSet's args with every path
    # moved under `root` (the metrics address stays: the daemon runs in its own netns).
    for m in c["volumeMounts"]:
        target = root / m["mountPath"].lstrip("/")
        volume = volumes[m["name"]]
        if "configMap" in volume:
            (cm,) = load(deployments, "virtdp-config.yaml")
            target.mkdir(parents=True)
            for key, text in cm["data"].items():
                (target / key).write_text(text)
        elif volume.get("hostPath", {}).get("path") == "/sys":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(fake_sysfs.root)
        else:
            target.mkdir(parents=True, exist_ok=True)
    args = [f"{root}{a}" if a.startswith("/") else a for a in c["args"]]

    ns = Netns("vdp")
    peer = Netns("vdp")
    proc: Optional[subprocess.Popen] = None
    try:
        veth(ns, "eth1", peer, "p1", mac="52:54:00:00:0a:01")
        fake_sysfs.add_virtio_nic("0000:00:0a.0", "eth1", mac="52:54:00:00:0a:01")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, *tool_command("virtdp-serve"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        path = c["livenessProbe"]["httpGet"]["path"]
        port = c["ports"][0]["containerPort"]
        base = f"http://127.0.0.1:{port}"
        wait_for(ns, base + path, 200, proc, timeout=60)
        assert fake_kubelet.registered.wait(30), "virtdp-serve never registered"
        wait_for(ns, base + c["readinessProbe"]["httpGet"]["path"], 200, proc, timeout=30)
        (req,) = fake_kubelet.requests
        assert req.version == registration.API_VERSION
        assert req.resource_name == "kernel.org/virt"

        # What the kubelet would then see: the NIC from the fake sysfs, advertised healthy.
        sock = fake_kubelet.directory / req.endpoint
        with grpc.insecure_channel(f"unix://{sock}") as chan:
            stream = deviceplugin_pb2_grpc.DevicePluginStub(chan).ListAndWatch(
                deviceplugin_pb2.Empty(), timeout=10
            )
            first = next(iter(stream))
            stream.cancel()
        assert [(d.ID, d.health) for d in first.devices] == [("0000:00:0a.0", "Healthy")]

        scrape = wait_for(ns, base + "/metrics", 200, proc, timeout=10)
        assert 'virtdp_pool_registered{resource="kernel.org/virt"} 1.0' in scrape

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == "", "stdout carries data only; the daemon has none"
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and all(json.loads(line)["msg"] for line in lines), "--log-format json"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        ns.close()
        peer.close()


# -- the NetworkAttachmentDefinition, run -------------------------------------------------------


def test_nad_config_plumbs_a_nic_with_the_real_ehost_device(
    deployments: Path, fake_sysfs: Any, tmp_path: Path
) -> None:
    # The NAD's config exactly as Multus hands it over (plus the deviceID it injects), run by
    # the shipped ehost-device with the real host-local, in a scratch "node" namespace. Only
    # where state lands is redirected: leases and the log into tmp_path, sysfs to the fake tree.
    import ipaddress

    (nad,) = load(deployments, "ehost-device-nad.yaml")
    conf = json.loads(nad["spec"]["config"])
    conf["ipam"]["dataDir"] = str(tmp_path / "leases")
    policy_env = node_policy(
        tmp_path / "ehost-device.yaml",
        str(fake_sysfs.root),
        logFile=str(tmp_path / "ehost-device.log"),
    )
    pci_address = "0000:00:0b.0"
    conf["deviceID"] = conf["pciBusID"] = pci_address

    node, pod, peer = Netns("vdn"), Netns("vdp"), Netns("vdq")
    try:
        veth(node, "eth1", peer, "p1", mac="52:54:00:00:0b:01")
        fake_sysfs.add_virtio_nic(pci_address, "eth1", mac="52:54:00:00:0b:01")
        env = {
            **os.environ,
            "CNI_CONTAINERID": "deploytest",
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "net1",
            "CNI_PATH": "/usr/lib/cni",
            # What containerd and CRI-O pass (through Multus): IgnoreUnknown=1 first, or
            # host-local refuses the K8S_* keys it does not know.
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=virtdp-test-a;"
            "K8S_POD_INFRA_CONTAINER_ID=deploytest",
            **policy_env,
        }

        def cni(command: str) -> subprocess.CompletedProcess:
            return node.exec(
                *tool_command("ehost-device"),
                env={**env, "CNI_COMMAND": command},
                input=json.dumps(conf),
                check=False,
            )

        add = cni("ADD")
        assert add.returncode == 0, add.stdout + add.stderr
        result = json.loads(add.stdout)
        assert result["cniVersion"] == conf["cniVersion"]
        assert "net1" in pod.links() and "eth1" not in node.links()
        (ip,) = result["ips"]
        (r,) = conf["ipam"]["ranges"][0]
        address = ipaddress.ip_interface(ip["address"])
        first, last = (int(ipaddress.ip_address(r[k])) for k in ("rangeStart", "rangeEnd"))
        assert first <= int(address.ip) <= last
        assert str(address) in pod.exec("ip", "-o", "addr", "show", "net1").stdout

        delete = cni("DEL")
        assert delete.returncode == 0, delete.stdout + delete.stderr
        assert "eth1" in node.links() and "net1" not in pod.links()
        assert (tmp_path / "ehost-device.log").is_file()
    finally:
        pod.close()
        node.close()
        peer.close()


def executor_container(deployments: Path) -> Doc:
    (c,) = (c for c in pod_spec(deployments)["containers"] if c["name"] == "ehost-device-executor")
    return c


def test_executor_container_serves_where_the_plugin_looks(deployments: Path) -> None:
    """The executor's socket is the front's default, its readiness probe asks that socket, and
    it sees the host paths a CNI call touches at the same paths."""
    from ehost_device import front, locks

    c = executor_container(deployments)
    args = c["args"]
    assert args[0] == "serve"
    flags = flag_values(args[1:])
    assert flags["--socket"] == front.DEFAULT_SOCKET
    for probe in ("readinessProbe", "startupProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[0] == c["command"][0] and cmd[1:] == ["probe", "--socket", front.DEFAULT_SOCKET]
    spec = pod_spec(deployments)
    assert spec["hostNetwork"] is True, "a call's host namespace is the executor's own"
    assert c["securityContext"]["privileged"] is True
    for path in ("/opt/cni/bin", "/var/lib/cni", os.path.dirname(front.DEFAULT_SOCKET), "/sys"):
        _, volume = mount_for(deployments, c, path)
        assert volume["hostPath"]["path"] == path, f"{path} must be the host's {path}"
    assert os.path.dirname(locks.LOCK_DIR) == os.path.dirname(front.DEFAULT_SOCKET)
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    _, tmp = mount_for(deployments, c, "/tmp")
    assert env["PEX_ROOT"].startswith("/tmp/") and "emptyDir" in tmp


def ehost_device_help(verb: str) -> str:
    """`ehost-device <verb> --help` as shipped."""
    p = subprocess.run(
        [*tool_command("ehost-device"), verb, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_executor_args_parse_with_the_real_cli(deployments: Path, tmp_path: Path) -> None:
    """`ehost-device serve --help` as shipped lists every flag the DaemonSet passes."""
    c = executor_container(deployments)
    help_text = ehost_device_help("serve")
    for flag in flag_values(c["args"][1:]):
        assert flag in help_text, f"ehost-device serve --help does not list {flag}"


def test_policy_installer_args_parse_with_the_real_cli(deployments: Path) -> None:
    """`ehost-device install-policy --help` as shipped lists every flag the init container and
    policy-sync pass."""
    spec = pod_spec(deployments)
    help_text = ehost_device_help("install-policy")
    for c in spec["initContainers"] + spec["containers"]:
        cmd = c.get("command", []) + c.get("args", [])
        if cmd[1:2] != ["install-policy"]:
            continue
        for arg in cmd[2:]:
            if arg.startswith("--"):
                assert arg in help_text, f"install-policy --help does not list {arg}"
