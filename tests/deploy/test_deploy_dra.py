"""deployments/dra/ (the DRA component): the DaemonSet it makes agrees with virtdp-serve's command
line and defaults, the RBAC allows every request the DRA code makes (recorded by driving it
against the test API server) and no more than the issue lists, and the DeviceClass, the
claimed-NIC network and the example agree with each other and with the driver."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple
from urllib.parse import parse_qs

import typer
from kustomize import load, patch_files, render
from test_deploy_manifests import check_pod_spec
from testapiserver import TestApiServer

from virtcore import claims, kubeapi
from virtdp_serve import claimstatus, slices
from virtdp_serve.inventory import DraDevice

Doc = Dict[str, Any]
DRIVER = claims.DEFAULT_DRIVER


def rendered(deployments: Path) -> List[Doc]:
    return render(deployments, "dra")[0]


def one(docs: List[Doc], kind: str, name: str = "") -> Doc:
    found = [d for d in docs if d["kind"] == kind and (not name or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def serve(deployments: Path) -> Tuple[Doc, Doc]:
    spec = one(rendered(deployments), "DaemonSet", "virtdp")["spec"]["template"]["spec"]
    (c,) = (c for c in spec["containers"] if c["name"] == "virtdp-serve")
    return spec, c


def flags(args: List[str]) -> Dict[str, str]:
    it = iter(args)
    return {a: next(it) for a in it}


def test_component_files_and_patch_target(deployments: Path) -> None:
    docs, comp = render(deployments, "dra")
    for res in comp["resources"]:
        assert (deployments / "dra" / res).is_file(), res
    kinds = {d["kind"] for d in docs}
    assert {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DeviceClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "DaemonSet",
        "NetworkAttachmentDefinition",
    } <= kinds
    assert [p.name for p in patch_files(deployments)] == ["daemonset-dra.patch.yaml"]
    spec, _ = serve(deployments)
    check_pod_spec(spec, "dra DaemonSet")  # volumes, mounts, names as for the base


def test_dra_daemonset_args_parse_with_the_real_cli(deployments: Path, fake_sysfs: Any) -> None:
    from virtdp_serve import cli

    spec, c = serve(deployments)
    cmd = typer.main.get_command(cli.app)
    env = {e["name"]: e for e in c["env"]}
    node = env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node == "spec.nodeName"  # the downward API: the pod's node
    # --sysfs-root must name a sysfs tree: the node's /host/sys is not here (the base's mount
    # test checks that path); parse with a fake tree in its place.
    args = list(c["args"])
    assert args[args.index("--sysfs-root") + 1] == "/host/sys"
    args[args.index("--sysfs-root") + 1] = str(fake_sysfs.root)
    os.environ["NODE_NAME"] = "node-a"
    try:
        ctx = cmd.make_context("virtdp-serve", args)
    finally:
        del os.environ["NODE_NAME"]
    assert ctx.params["mode"].value == "dra"
    assert ctx.params["node_name"] == "node-a"  # from $NODE_NAME, no flag needed
    assert ctx.params["kubeconfig"] is None  # in-cluster: the ServiceAccount's token
    assert spec["serviceAccountName"] == "virtdp" and spec["automountServiceAccountToken"]
    # The base's flags are all still there (args is replaced whole by the patch).
    (base,) = load(deployments / "virtdp-daemonset.yaml")
    (base_c,) = (
        x for x in base["spec"]["template"]["spec"]["containers"] if x["name"] == c["name"]
    )
    assert flags(base_c["args"]).items() <= flags(c["args"]).items()


def test_dra_paths_are_the_defaults_and_mounted_at_the_same_host_paths(deployments: Path) -> None:
    from virtdp_serve import cli

    spec, c = serve(deployments)
    given = flags(c["args"])
    opts = {o: p for p in typer.main.get_command(cli.app).params for o in getattr(p, "opts", [])}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for flag in ("--dra-state-dir", "--kubelet-registry-dir", "--kubelet-plugins-dir"):
        assert given[flag] == str(opts[flag].default), f"{flag}: pass the default"
    assert given["--dra-state-dir"] == claims.DEFAULT_DIR
    socket_dir = os.path.join(given["--kubelet-plugins-dir"], DRIVER)  # <dir>/<driver>/dra.sock
    for path in (given["--dra-state-dir"], given["--kubelet-registry-dir"], socket_dir):
        assert path in mounts, f"virtdp-serve: {path} not mounted"
        assert not mounts[path].get("readOnly"), f"{path}: virtdp-serve writes there"
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    # ehost-device (in the executor too) reads claims.json and writes status files there.
    (ex,) = (x for x in spec["containers"] if x["name"] == "ehost-device-executor")
    ex_mounts = {m["mountPath"]: m for m in ex["volumeMounts"]}
    state = ex_mounts[claims.DEFAULT_DIR]
    assert not state.get("readOnly")
    assert volumes[state["name"]]["hostPath"]["path"] == claims.DEFAULT_DIR


# -- RBAC covers what the code does ---------------------------------------------------------

_PATH = re.compile(
    r"/(?:apis/(?P<group>[a-z0-9.]+)/v1|api/v1)(?:/namespaces/[^/]+)?/(?P<res>[a-z]+)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?"
)


def requests_as_rbac(api: TestApiServer) -> Set[Tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of every request the server saw, as the API
    server's authorizer names them."""
    out = set()
    for method, path, query in api.requests:
        m = _PATH.fullmatch(path)
        assert m, path
        group, res = m.group("group") or "", m.group("res")
        if m.group("sub"):
            res += "/" + m.group("sub")
        named = bool(m.group("name"))
        q = parse_qs(query)
        verb = {
            "GET": "get" if named else ("watch" if q.get("watch") == ["true"] else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }[method]
        out.add((group, res, verb))
    return out


def allowed(role: Doc, group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in role["rules"]
    )


def drive_the_dra_code(api: TestApiServer, kube: kubeapi.Kube, state_dir: str) -> None:
    """Publish slices through every path (create, update, delete, conflict), write and remove a
    claim's status (with a conflict), and read a claim as NodePrepareResources does."""
    from virtdp_serve import dra

    p = slices.Publisher(kube, node="node-a", backoff_max=0.5)
    w = claimstatus.StatusWriter(kube, driver=DRIVER, state_dir=state_dir, backoff_max=0.5)
    p.start()
    w.start()
    try:
        addresses = [f"0000:{1 + i // 32:02x}:{i % 32:02x}.0" for i in range(70)]
        devs = [
            DraDevice(
                claims.device_name(a), a, "kernel.org/virt", 0, None, None, None, None, None, None
            )
            for a in addresses
        ]
        p.update(devs)
        assert p.wait_in_sync(10)
        slice_name = sorted(s["metadata"]["name"] for s in api.list("resourceslices"))[0]
        api.conflict_next("resourceslices", slice_name)
        p.update(devs[:10])  # an update meeting a 409, then a delete
        assert p.wait_in_sync(10)
        claim = api.create(
            "resourceclaims",
            {"metadata": {"name": "c1", "namespace": "ns1"}, "spec": {"devices": {"requests": []}}},
        )
        claim["status"] = {
            "allocation": {
                "devices": {
                    "results": [
                        {
                            "request": "nic",
                            "driver": DRIVER,
                            "pool": "node-a",
                            "device": devs[0].name,
                        }
                    ]
                }
            }
        }
        claim = api.update("resourceclaims", claim, subresource="status")
        api.conflict_next("resourceclaims", "c1")
        st = claims.DeviceStatus(
            claim["metadata"]["uid"],
            "ns1",
            "c1",
            DRIVER,
            "node-a",
            devs[0].name,
            str(uuid.uuid4()),
            "ctr",
            "net1",
            "net1",
            ("198.51.100.2/24",),
            "52:54:00:00:00:01",
        )
        claims.write_status(state_dir, st)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            (api.get("resourceclaims", "c1", "ns1") or {}).get("status", {}).get("devices")
        ):
            time.sleep(0.05)
        # NodePrepareResources reads the claim (its reader, through the same client).
        dra.kube_reader(kube)("ns1", "c1", 5.0)
    finally:
        p.stop()
        w.stop()


def test_rbac_allows_every_request_of_the_dra_code(deployments: Path, tmp_path: Path) -> None:
    docs = rendered(deployments)
    role = one(docs, "ClusterRole", "virtdp-dra")
    with TestApiServer(bookmark_interval=0.2) as api:
        api.create("nodes", {"metadata": {"name": "node-a"}})
        api.requests.clear()
        kube = kubeapi.connect(api.kubeconfig(str(tmp_path / "kubeconfig")))
        drive_the_dra_code(api, kube, str(tmp_path / "dra"))
        made = requests_as_rbac(api)
    assert ("resource.k8s.io", "resourceslices", "update") in made  # it did go every path
    assert ("resource.k8s.io", "resourceslices", "delete") in made
    assert ("resource.k8s.io", "resourceclaims/status", "patch") in made
    missing = sorted(r for r in made if not allowed(role, *r))
    assert not missing, f"the ClusterRole does not allow: {missing}"
    # Kubernetes 1.36 authorizes status.devices per driver, for the claim's own node.
    (driver_rule,) = (r for r in role["rules"] if "resourceclaims/driver" in r["resources"])
    assert driver_rule["resourceNames"] == [DRIVER]
    assert {"associated-node:patch", "associated-node:update"} == set(driver_rule["verbs"])


def test_rbac_is_no_wider_than_the_issue_lists(deployments: Path) -> None:
    role = one(rendered(deployments), "ClusterRole", "virtdp-dra")
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    wanted = {
        ("resource.k8s.io", "resourceslices", v)
        for v in ("get", "list", "watch", "create", "update", "patch", "delete")
    }
    wanted |= {("resource.k8s.io", "resourceclaims", v) for v in ("get", "list", "watch")}
    wanted |= {("resource.k8s.io", "resourceclaims/status", v) for v in ("update", "patch")}
    wanted |= {
        ("resource.k8s.io", "resourceclaims/driver", "associated-node:" + v)
        for v in ("update", "patch")
    }
    wanted |= {("", "nodes", "get")}
    assert granted == wanted
    docs = rendered(deployments)
    binding = one(docs, "ClusterRoleBinding", "virtdp-dra")
    sa = one(docs, "ServiceAccount", "virtdp")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "virtdp-dra",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "virtdp", "namespace": sa["metadata"]["namespace"]}
    ]
    ds = one(docs, "DaemonSet", "virtdp")
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"]
    policy = one(docs, "ValidatingAdmissionPolicy")
    (cond,) = policy["spec"]["matchConditions"]
    assert f"system:serviceaccount:{sa['metadata']['namespace']}:virtdp" in cond["expression"]
    assert (
        one(docs, "ValidatingAdmissionPolicyBinding")["spec"]["policyName"]
        == policy["metadata"]["name"]
    )


def test_device_class_network_and_example_agree(deployments: Path) -> None:
    docs = rendered(deployments)
    dc = one(docs, "DeviceClass")
    assert dc["metadata"]["name"] == DRIVER
    assert dc["spec"]["selectors"] == [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]
    (cm,) = load(deployments / "virtdp-config.yaml")
    pools_yaml = cm["data"]["config.yaml"]
    assert dc["spec"]["extendedResourceName"] == "kernel.org/virt"
    assert "kernel.org/virt" in pools_yaml  # the pool the device plugin offers under that name
    nad = one(docs, "NetworkAttachmentDefinition", "virtdp-claimed")
    assert "k8s.v1.cni.cncf.io/resourceName" not in nad["metadata"].get("annotations", {})
    import json

    conf = json.loads(nad["spec"]["config"])
    assert conf["type"] == "ehost-device"
    assert not {"deviceID", "pciBusID", "device", "hwaddr"} & conf.keys()  # the claim names it
    example = load(deployments / "dra" / "examples" / "nic-claim-pod.yaml")
    tmpl = one(example, "ResourceClaimTemplate")
    pod = one(example, "Pod")
    check_pod_spec(pod["spec"], "dra example pod")
    (req,) = tmpl["spec"]["spec"]["devices"]["requests"]
    assert req["exactly"]["deviceClassName"] == dc["metadata"]["name"]
    (rc,) = pod["spec"]["resourceClaims"]
    assert rc["resourceClaimTemplateName"] == tmpl["metadata"]["name"]
    assert pod["spec"]["containers"][0]["resources"]["claims"] == [{"name": rc["name"]}]
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == nad["metadata"]["name"]
    assert (
        tmpl["metadata"]["namespace"]
        == pod["metadata"]["namespace"]
        == nad["metadata"]["namespace"]
    )
    # The opaque config is one the driver's prepare accepts.
    from virtdp_serve import prepare

    (cfg,) = tmpl["spec"]["spec"]["devices"]["config"]
    assert cfg["opaque"]["driver"] == DRIVER
    assert set(cfg["opaque"]["parameters"]) <= set(prepare.CONFIG_KEYS)
    assert claims.ifname_problem(cfg["opaque"]["parameters"]["interfaceName"]) is None
    assert cfg["requests"] == [req["name"]]


def test_base_kustomization_leaves_the_component_off(deployments: Path) -> None:
    # Off by default (the device plugin works from Kubernetes 1.25); one line turns DRA on.
    text = (deployments / "kustomization.yaml").read_text()
    assert "\n# components: [dra]" in text
    assert "components" not in load(deployments / "kustomization.yaml")[0]
