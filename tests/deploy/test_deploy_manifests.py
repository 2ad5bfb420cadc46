"""deployments/: the manifests keep the API server's name and reference rules (which the
OpenAPI schemas of test_deploy_schemas.py do not express), and agree with each other, with the
pool config code and with the Containerfile."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml
from kustomize import patch_files

from virtcore import pools

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
NAMESPACED = {
    "DaemonSet",
    "ConfigMap",
    "Pod",
    "NetworkAttachmentDefinition",
    "PodMonitor",
    "ServiceAccount",
    "ResourceClaimTemplate",
}
# Read by kustomize, never objects of their own (deployments/dra/ is a component with a patch).
CLIENT_SIDE = {"Kustomization", "Component"}
TOOLS = ("virtdp-serve", "virtdp-inspect", "virtdp-discover", "ehost-device")
RESOURCE_ANNOTATION = "k8s.v1.cni.cncf.io/resourceName"
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"

Doc = Dict[str, Any]


def manifests(deployments: Path) -> Iterator[Tuple[Path, Doc]]:
    """Every document of deployments/ except the patches kustomizations apply (partial objects:
    test_deploy_dra.py checks what they make)."""
    patches = set(patch_files(deployments))
    for path in sorted(deployments.rglob("*.yaml")):
        if path.resolve() in patches:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def by_kind(deployments: Path, kind: str) -> List[Doc]:
    return [d for _, d in manifests(deployments) if d.get("kind") == kind]


def one(deployments: Path, kind: str, name: str) -> Doc:
    found = [d for d in by_kind(deployments, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deployments/, found {len(found)}"
    return found[0]


def check_pod_spec(spec: Doc, where: str) -> None:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert len(volumes) == len(spec.get("volumes", [])), f"{where}: duplicate volume names"
    for v in volumes.values():
        sources = set(v) - {"name"}
        assert len(sources) == 1, f"{where}: volume {v['name']} needs exactly one source"
        assert DNS_LABEL.match(v["name"]), f"{where}: volume name {v['name']!r}"
    containers = spec.get("initContainers", []) + spec["containers"]
    names = [c["name"] for c in containers]
    assert len(set(names)) == len(names), f"{where}: duplicate container names {names}"
    for c in containers:
        cw = f"{where} container {c['name']}"
        assert DNS_LABEL.match(c["name"]), cw
        assert c.get("image"), f"{cw}: image is required"
        mounts = c.get("volumeMounts", [])
        paths = [m["mountPath"] for m in mounts]
        assert len(set(paths)) == len(paths), f"{cw}: duplicate mountPath"
        for m in mounts:
            assert m["name"] in volumes, f"{cw}: mount of undeclared volume {m['name']!r}"
            assert m["mountPath"].startswith("/"), f"{cw}: mountPath must be absolute"
        ports = {p["name"]: p for p in c.get("ports", [])}
        for p in ports.values():
            assert len(p["name"]) <= 15 and DNS_LABEL.match(p["name"]), f"{cw}: port name"
            assert 0 < p["containerPort"] < 65536
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c:
                handlers = set(c[probe]) & {"httpGet", "exec", "tcpSocket", "grpc"}
                assert len(handlers) == 1, f"{cw}: {probe} needs exactly one handler"
                if "exec" in c[probe]:
                    assert c[probe]["exec"]["command"], f"{cw}: {probe} exec without a command"
                    continue
                port = c[probe][handlers.pop()]["port"]
                assert port in ports or isinstance(port, int), f"{cw}: {probe} port {port!r}"
        res = c.get("resources", {})
        for key, req in res.get("requests", {}).items():
            if "/" in key:  # extended resources: Kubernetes wants requests == limits
                assert res.get("limits", {}).get(key) == req, f"{cw}: {key} requests != limits"


def test_every_manifest_keeps_the_api_servers_name_and_reference_rules(deployments: Path) -> None:
    # Types, required fields and unknown fields: test_deploy_schemas.py, with the real schemas.
    kinds = []
    for path, doc in manifests(deployments):
        where = f"{path.relative_to(deployments)} ({doc.get('kind')})"
        kind = doc.get("kind")
        kinds.append(kind)
        if kind in CLIENT_SIDE:
            continue
        meta = doc["metadata"]
        assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, where
        if kind in NAMESPACED:
            assert DNS_LABEL.match(meta.get("namespace", "")), f"{where}: metadata.namespace"
        if kind == "DaemonSet":
            spec = doc["spec"]
            selector = spec["selector"]["matchLabels"]
            labels = spec["template"]["metadata"]["labels"]
            assert selector and selector.items() <= labels.items(), f"{where}: selector"
            check_pod_spec(spec["template"]["spec"], where)
        elif kind == "Pod":
            check_pod_spec(doc["spec"], where)
        elif kind == "NetworkAttachmentDefinition":
            conf = json.loads(doc["spec"]["config"])
            assert {"cniVersion", "name", "type"} <= conf.keys(), where
        elif kind == "PodMonitor":
            # An empty selector would select every pod of the namespace.
            assert doc["spec"]["selector"]["matchLabels"], where
            assert doc["spec"]["podMetricsEndpoints"], where
    assert {"DaemonSet", "ConfigMap", "NetworkAttachmentDefinition", "Pod"} <= set(kinds)
    assert kinds.count("Pod") == 4, "the two test pods, the debug pod and the DRA example"


def test_kustomization_lists_existing_files_and_the_image(deployments: Path) -> None:
    (kust,) = by_kind(deployments, "Kustomization")
    for res in kust["resources"]:
        assert (deployments / res).is_file(), f"kustomization.yaml: {res} does not exist"
    images = {
        c["image"].rsplit(":", 1)[0]
        for path, doc in manifests(deployments)
        if path.parent == deployments and doc["kind"] == "DaemonSet"
        for c in doc["spec"]["template"]["spec"]["initContainers"]
        + doc["spec"]["template"]["spec"]["containers"]
    }
    assert images == {i["name"] for i in kust["images"]}


def test_pool_config_validates_and_names_the_nads_resource(deployments: Path) -> None:
    cm = one(deployments, "ConfigMap", "virtdp-config")
    config = pools.parse_config(cm["data"]["config.yaml"], "virtdp-config/config.yaml")
    resources = {p.resource_name for p in config.pools}
    # The device plugin's networks (deployments/dra/ has one that names no resource: the
    # claim names the NIC; test_deploy_dra.py checks it).
    nads = [
        d
        for path, d in manifests(deployments)
        if d["kind"] == "NetworkAttachmentDefinition"
        and "dra" not in path.relative_to(deployments).parts
    ]
    assert nads
    for nad in nads:
        resource = nad["metadata"]["annotations"][RESOURCE_ANNOTATION]
        assert resource in resources, f"NAD {nad['metadata']['name']}: no pool named {resource}"
        conf = json.loads(nad["spec"]["config"])
        assert conf["type"] == "ehost-device"
        assert conf["name"] == nad["metadata"]["name"]
        assert conf["ipam"]["type"] == "host-local"


def test_nads_ipam_works_with_the_real_host_local(
    deployments: Path, tmp_path: Path, netns: Any
) -> None:
    # The IPAM section must be what host-local understands: run the real plugin (as
    # ehost-device will delegate to it) with the NAD's config, leases kept in a temp dir.
    import ipaddress
    import os
    import subprocess

    nad = one(deployments, "NetworkAttachmentDefinition", "virtdp-net")
    conf = json.loads(nad["spec"]["config"])
    conf["ipam"]["dataDir"] = str(tmp_path / "leases")
    env = {
        **os.environ,
        "CNI_CONTAINERID": "deploy-test",
        "CNI_NETNS": netns.path,
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/usr/lib/cni",
    }
    add = subprocess.run(
        ["/usr/lib/cni/host-local"],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env={**env, "CNI_COMMAND": "ADD"},
    )
    assert add.returncode == 0, add.stdout + add.stderr
    result = json.loads(add.stdout)
    (r,) = conf["ipam"]["ranges"][0]
    (ip,) = result["ips"]
    address = ipaddress.ip_interface(ip["address"])
    assert address.network == ipaddress.ip_network(r["subnet"])
    first, last = (int(ipaddress.ip_address(r[k])) for k in ("rangeStart", "rangeEnd"))
    assert first <= int(address.ip) <= last
    assert [x["dst"] for x in result["routes"]] == [x["dst"] for x in conf["ipam"]["routes"]]
    delete = subprocess.run(
        ["/usr/lib/cni/host-local"],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env={**env, "CNI_COMMAND": "DEL"},
    )
    assert delete.returncode == 0, delete.stdout + delete.stderr


def smoke_pods(deployments: Path) -> List[Doc]:
    return [
        p
        for p in by_kind(deployments, "Pod")
        if p["metadata"]["labels"]["app.kubernetes.io/name"] == "virtdp-test"
    ]


def test_test_pods_request_the_pool_and_name_the_nad(deployments: Path) -> None:
    nads = {n["metadata"]["name"]: n for n in by_kind(deployments, "NetworkAttachmentDefinition")}
    pods = smoke_pods(deployments)
    assert len(pods) == 2
    for pod in pods:
        name = pod["metadata"]["name"]
        networks = pod["metadata"]["annotations"][NETWORKS_ANNOTATION].split(",")
        for net in networks:
            net = net.strip().split("@")[0]
            ns, _, nad_name = net.rpartition("/")
            assert nad_name in nads, f"pod {name}: no NetworkAttachmentDefinition {nad_name}"
            nad = nads[nad_name]
            assert (ns or pod["metadata"]["namespace"]) == nad["metadata"]["namespace"]
            resource = nad["metadata"]["annotations"][RESOURCE_ANNOTATION]
            wanted = sum(
                int(c["resources"]["limits"].get(resource, 0)) for c in pod["spec"]["containers"]
            )
            assert wanted >= networks.count(net), f"pod {name}: asks {wanted} {resource}"


def daemonset(deployments: Path) -> Doc:
    return one(deployments, "DaemonSet", "virtdp")


def containerfile(deployments: Path) -> Tuple[Dict[str, str], str]:
    """COPY sources → destination, and the text of the RUN instructions."""
    text = (deployments / "Containerfile").read_text().replace("\\\n", " ")
    copies: Dict[str, str] = {}
    runs = []
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "COPY":
            *srcs, dest = shlex.split(words[1])
            for src in srcs:
                copies[src] = dest + Path(src).name if dest.endswith("/") else dest
        elif words[0] == "RUN":
            runs.append(words[1])
        elif words[0] == "ARG" and words[1].startswith("BASE="):
            assert "python:3.11" in words[1], "the PEX files need CPython 3.11: default BASE"
        elif words[0] == "FROM":
            assert words[1] == "${BASE}", "the base is the build argument BASE"
    return copies, "\n".join(runs)


def test_containerfile_ships_the_pex_files_and_the_installer(
    deployments: Path, repo_root: Path
) -> None:
    copies, runs = containerfile(deployments)
    for tool in TOOLS:
        assert f"dist/{tool}.pex" in copies, f"Containerfile does not copy dist/{tool}.pex"
        assert (repo_root / "tools" / tool).is_dir(), f"no tools/{tool} for dist/{tool}.pex"
    for src in copies:
        assert src.startswith("dist/") or (repo_root / src).is_file(), f"COPY {src}: missing"
    assert "deployments/install-cni.sh" in copies
    # The wrapper commands the DaemonSet runs are made by the RUN step.
    for tool in ("virtdp-serve", "virtdp-inspect", "virtdp-discover"):
        assert tool in runs
    assert "/usr/local/bin/$tool" in runs and "/opt/virtdp/%s.pex" in runs


def test_init_container_installs_the_shipped_plugin_into_host_cni_bin(deployments: Path) -> None:
    copies, _ = containerfile(deployments)
    spec = daemonset(deployments)["spec"]["template"]["spec"]
    (init,) = (c for c in spec["initContainers"] if c["name"] == "install-cni")
    script, source, bindir, name = init["command"]
    assert script == copies["deployments/install-cni.sh"]
    assert source == copies["dist/ehost-device.pex"]
    assert name == "ehost-device", "the NAD's type is the file name the runtime execs"
    nad = one(deployments, "NetworkAttachmentDefinition", "virtdp-net")
    assert json.loads(nad["spec"]["config"])["type"] == name
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = (m for m in init["volumeMounts"] if m["mountPath"] == bindir)
    assert volumes[mount["name"]]["hostPath"]["path"] == "/opt/cni/bin"
    assert not mount.get("readOnly")


def test_the_node_policy_is_installed_first_and_kept_in_step(deployments: Path) -> None:
    # ehost-device reads /etc/virtdp/ehost-device.yaml and the pool config it names on the
    # host (ehost_device.policy); the executor container reads them at the same paths. The
    # DaemonSet installs every key of the ConfigMap there with `ehost-device install-policy`:
    # once before the plugin (init), then on every ConfigMap update (policy-sync, --watch).
    from ehost_device import front, install, policy

    copies, _ = containerfile(deployments)
    spec = daemonset(deployments)["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("install-policy") < names.index("install-cni"), names
    (init,) = (c for c in spec["initContainers"] if c["name"] == "install-policy")
    (sync,) = (c for c in spec["containers"] if c["name"] == "policy-sync")
    (executor,) = (c for c in spec["containers"] if c["name"] == "ehost-device-executor")
    pex, verb, *args = init["command"]
    assert (pex, verb) == (copies["dist/ehost-device.pex"], "install-policy")
    assert "args" not in init and sync["command"] == init["command"]
    assert sync["args"] == ["--watch"]
    flags: Dict[str, List[str]] = {}
    for flag, value in zip(args[::2], args[1::2]):
        flags.setdefault(flag, []).append(value)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in (init, sync):
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        (target,) = flags["--to"]
        assert volumes[mounts[target]["name"]]["hostPath"]["path"] == install.NODE_DIR
        assert not mounts[target].get("readOnly")
        (source,) = flags["--from"]
        assert volumes[mounts[source]["name"]]["configMap"]["name"] == "virtdp-config"
        # PEX_ROOT in a writable mount: the root filesystem is read-only.
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert env["PEX_ROOT"].startswith("/tmp/") and "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert install.NODE_DIR == os.path.dirname(policy.DEFAULT_PATH)
    # --shared: exactly host directories the executor mounts at the same paths, among them
    # every default path of the policy and the ConfigMap's example log file's directory.
    executor_mounts = {
        m["mountPath"]: volumes[m["name"]].get("hostPath", {}).get("path")
        for m in executor["volumeMounts"]
    }
    for shared in flags["--shared"]:
        assert executor_mounts.get(shared) == shared, f"the executor does not mount {shared}"
    cm = one(deployments, "ConfigMap", "virtdp-config")
    example_log = next(
        line.split("logFile:")[1].split()[0]
        for line in cm["data"]["ehost-device.yaml"].splitlines()
        if "logFile:" in line
    )
    for path in (install.NODE_DIR, "/sys", os.path.dirname(front.DEFAULT_SOCKET)):
        assert path in flags["--shared"], path
    assert os.path.dirname(example_log) in flags["--shared"]
    (socket,) = flags["--executor-socket"]
    assert executor["args"][executor["args"].index("--socket") + 1] == socket
    # The shipped ConfigMap installs as it is, and with its commented-out keys switched on.
    layout = install.Layout(
        source="/etc/virtdp",
        target="/host/etc/virtdp",
        shared=tuple(flags["--shared"]),
        executor_socket=socket,
    )
    keys = {k: v.encode() for k, v in cm["data"].items()}
    assert install.check(keys, layout).pool_config == "/etc/virtdp/config.yaml"
    switched = "\n".join(
        (
            line.lstrip("# ").split("  #")[0]
            if re.match(r"# *(logFile|allowedPools|poolConfig):", line)
            else line
        )
        for line in cm["data"]["ehost-device.yaml"].splitlines()
    )
    on = install.check(dict(keys, **{"ehost-device.yaml": switched.encode()}), layout)
    assert on.allowed_pools == ("kernel.org/virt",) and on.log_file == example_log


def test_serve_container_runs_the_wrapper_the_image_makes(deployments: Path) -> None:
    spec = daemonset(deployments)["spec"]["template"]["spec"]
    (serve,) = (c for c in spec["containers"] if c["name"] == "virtdp-serve")
    assert serve["command"] == ["/usr/local/bin/virtdp-serve"]
    ann = daemonset(deployments)["spec"]["template"]["metadata"]["annotations"]
    (port,) = serve["ports"]
    assert ann["prometheus.io/port"] == str(port["containerPort"])
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["resources"]["requests"] and serve["resources"]["limits"]
    (pm,) = by_kind(deployments, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == port["name"]
    labels = daemonset(deployments)["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", ["virtdp-config.yaml", "virtdp-daemonset.yaml"])
def test_manifest_names_are_kube_system(deployments: Path, name: str) -> None:
    for doc in yaml.safe_load_all((deployments / name).read_text()):
        assert doc["metadata"]["namespace"] == "kube-system"
