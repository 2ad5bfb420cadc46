"""A Kubernetes pod spec (from deployments/) turned into the CRI configs the kubelet would send
containerd, with the node's host paths moved under a test directory.

Follows the kubelet's kuberuntime (`generatePodSandboxConfig`, `generateContainerConfig`,
`makeMounts`, `determineEffectiveSecurityContext`): hostNetwork -> NamespaceMode NODE on the
sandbox and every container; runAsUser, readOnlyRootFilesystem, privileged and capabilities as
they are; allowPrivilegeEscalation: false -> no_new_privs; limits -> CFS quota over a 100 ms
period and a memory limit; a hostPath volume is its path (here: where the test keeps it), an
emptyDir a fresh directory of the pod, a configMap a directory laid out as the kubelet's
AtomicWriter does (tests/configmap.py), mounted read-only. A key of the pod spec this module
does not know fails the translation: the test breaks when the manifest grows something it does
not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import configmap
import cri_api_pb2 as api

Doc = Dict[str, Any]

# Pod spec keys: run here, or why not (scheduling and API-side keys have no CRI counterpart).
POD_KEYS = {
    "hostNetwork": "run",
    "containers": "run",
    "initContainers": "run",
    "volumes": "run",
    "terminationGracePeriodSeconds": "run",
    "priorityClassName": "scheduler only",
    "nodeSelector": "scheduler only",
    "tolerations": "scheduler only",
    "automountServiceAccountToken": "API server: no token volume when false",
}
CONTAINER_KEYS = {
    "name": "run",
    "image": "run",
    "command": "run",
    "args": "run",
    "env": "run",
    "volumeMounts": "run",
    "securityContext": "run",
    "resources": "run",
    "imagePullPolicy": "the image is imported, never pulled",
    "ports": "hostNetwork: the port is the node's; probes reach it there",
    "livenessProbe": "kubelet side: the test calls the probes' URLs itself",
    "readinessProbe": "kubelet side: the test calls the probes' URLs itself",
    "startupProbe": "kubelet side: the test calls the probes' URLs itself",
}
SECURITY_KEYS = {
    "runAsUser",
    "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
    "capabilities",
    "privileged",
}
CPU_PERIOD = 100_000  # the kubelet's default CFS period, microseconds


class Unsupported(AssertionError):
    """The manifest uses something this translation does not run."""


def _check_keys(doc: Doc, known: Any, where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise Unsupported(f"{where}: {unknown} not run by tests/runtime/podspec.py: teach it")


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (100m, 64Mi, 1G, 2) as a number."""
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|k|M|G)?", str(value))
    if m is None:
        raise Unsupported(f"resource quantity {value!r}: expected e.g. 100m, 64Mi, 1")
    scale = {
        None: 1,
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }[m.group(2)]
    return float(m.group(1)) * scale


@dataclass
class Pod:
    """A pod spec and the host directories that stand in for its volumes."""

    name: str
    spec: Doc
    volumes: Dict[str, Path]  # volume name -> host directory
    read_only_volumes: set

    @property
    def host_network(self) -> bool:
        return bool(self.spec.get("hostNetwork"))

    def containers(self, key: str = "containers") -> List[Doc]:
        return list(self.spec.get(key, []))

    def container(self, name: str) -> Doc:
        for c in self.containers("initContainers") + self.containers():
            if c["name"] == name:
                return c
        raise KeyError(f"pod {self.name}: no container {name}")


def lay_out(
    name: str,
    spec: Doc,
    root: Path,
    *,
    host_path: Callable[[str], Path],
    config_maps: Dict[str, Dict[str, str]],
) -> Pod:
    """Make the directories behind the pod's volumes under `root`; a hostPath goes where
    `host_path(path)` says (the test's stand-in for that node path)."""
    _check_keys(spec, POD_KEYS, f"pod {name}")
    volumes: Dict[str, Path] = {}
    read_only = set()
    for v in spec.get("volumes", []):
        vname = v["name"]
        if "hostPath" in v:
            path = host_path(v["hostPath"]["path"])
            kind = v["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "Directory" and not path.is_dir():
                raise AssertionError(f"volume {vname}: hostPath {path} must exist (type Directory)")
            volumes[vname] = path
        elif "emptyDir" in v:
            path = root / "volumes" / "kubernetes.io~empty-dir" / vname
            path.mkdir(parents=True)
            volumes[vname] = path
        elif "configMap" in v:
            path = root / "volumes" / "kubernetes.io~configmap" / vname
            path.mkdir(parents=True)
            # As the kubelet writes it: keys are symlinks through `..data` (tests/configmap.py).
            configmap.project(path, config_maps[v["configMap"]["name"]])
            volumes[vname] = path
            read_only.add(vname)  # the kubelet mounts configMap volumes read-only
        else:
            raise Unsupported(f"volume {vname}: only hostPath, emptyDir and configMap are run")
    return Pod(name, spec, volumes, read_only)


def sandbox_config(
    pod: Pod, *, uid: str, namespace: str, cgroup_parent: str, log_directory: Path
) -> Any:
    node = api.NODE if pod.host_network else api.POD
    log_directory.mkdir(parents=True, exist_ok=True)
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=pod.name, uid=uid, namespace=namespace),
        # As the kubelet: a hostNetwork pod keeps the node's hostname (and its UTS namespace).
        hostname="" if pod.host_network else pod.name,
        log_directory=str(log_directory),
        labels={"io.kubernetes.pod.name": pod.name},
        linux=api.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            # As the kubelet (kuberuntime's HasPrivilegedContainer): the sandbox is privileged
            # when any of the pod's containers is, or containerd refuses that container.
            security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(network=node, pid=api.CONTAINER),
                privileged=any(
                    c.get("securityContext", {}).get("privileged", False)
                    for c in pod.spec.get("initContainers", []) + pod.spec.get("containers", [])
                ),
            ),
        ),
    )


def container_config(pod: Pod, c: Doc, *, image: str, attempt: int = 0) -> Any:
    where = f"pod {pod.name} container {c['name']}"
    _check_keys(c, CONTAINER_KEYS, where)
    sc = c.get("securityContext", {})
    _check_keys(sc, SECURITY_KEYS, f"{where} securityContext")
    caps = sc.get("capabilities", {})
    security = api.LinuxContainerSecurityContext(
        capabilities=api.Capability(
            add_capabilities=caps.get("add", []), drop_capabilities=caps.get("drop", [])
        ),
        privileged=bool(sc.get("privileged", False)),
        namespace_options=api.NamespaceOption(
            network=api.NODE if pod.host_network else api.POD, pid=api.CONTAINER
        ),
        readonly_rootfs=bool(sc.get("readOnlyRootFilesystem", False)),
        no_new_privs=sc.get("allowPrivilegeEscalation") is False,
    )
    if "runAsUser" in sc:
        security.run_as_user.value = int(sc["runAsUser"])
    limits = c.get("resources", {}).get("limits", {})
    resources = api.LinuxContainerResources()
    if "cpu" in limits:
        resources.cpu_period = CPU_PERIOD
        resources.cpu_quota = int(quantity(limits["cpu"]) * CPU_PERIOD)
    if "memory" in limits:
        resources.memory_limit_in_bytes = int(quantity(limits["memory"]))
    mounts = []
    for m in c.get("volumeMounts", []):
        mounts.append(
            api.Mount(
                container_path=m["mountPath"],
                host_path=str(pod.volumes[m["name"]]),
                readonly=bool(m.get("readOnly")) or m["name"] in pod.read_only_volumes,
            )
        )
    envs = []
    for e in c.get("env", []):
        _check_keys(e, {"name", "value"}, f"{where} env")
        envs.append(api.KeyValue(key=e["name"], value=str(e.get("value", ""))))
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=c["name"], attempt=attempt),
        image=api.ImageSpec(image=image),
        command=c.get("command", []),
        args=c.get("args", []),
        envs=envs,
        mounts=mounts,
        # The kubelet's layout: <log_directory>/<container>/<restart count>.log
        log_path=f"{c['name']}/{attempt}.log",
        linux=api.LinuxContainerConfig(resources=resources, security_context=security),
    )
