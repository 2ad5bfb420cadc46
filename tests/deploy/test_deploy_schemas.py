"""deployments/: every Kubernetes object validates, strictly (no unknown field), against the real
OpenAPI schemas of the oldest and the newest Kubernetes version the operator guide claims
(kubernetes-validate ships them), and the custom resources against their CRDs' schemas
(tests/deploy/crds/: kubernetes-validate carries none)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from kustomize import patch_files, render

Doc = Dict[str, Any]
CRDS = Path(__file__).resolve().parent / "crds"
# Read by kubectl (`apply -k`) on the client, never sent to the API server: no OpenAPI schema.
# test_deploy_manifests checks what it lists.
CLIENT_SIDE = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
}
CLAIM = re.compile(r"^- Kubernetes (\d+\.\d+) or newer\b", re.M)
# deployments/dra/ (DRA, resource.k8s.io/v1) needs a newer Kubernetes than the rest: the
# version docs/dra-operator.md claims.
DRA_DIR = "dra"


def claimed_versions(repo_root: Path, page: str = "operator-guide.md") -> Tuple[str, str]:
    """The oldest version docs/<page> claims, and the newest Kubernetes there is a schema for
    (the page claims every newer one)."""
    guide = (repo_root / "docs" / page).read_text()
    found = CLAIM.findall(guide)
    assert len(found) == 1, (
        f"docs/{page}: expected one line '- Kubernetes X.Y or newer' in section 1, "
        f"found {found}"
    )
    return found[0], kv_utils.major_minor(kv_utils.latest_version())


def versions_for(where: str, repo_root: Path) -> Tuple[str, str]:
    """The oldest and newest Kubernetes a file of deployments/ must validate for."""
    if Path(where).parts[0] == DRA_DIR:
        return claimed_versions(repo_root, "dra-operator.md")
    return claimed_versions(repo_root)


def crd_schemas() -> Dict[Tuple[str, str], Doc]:
    """(apiVersion, kind) → the CRD's openAPIV3Schema, made strict."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        (crd,) = (d for d in yaml.safe_load_all(path.read_text()) if d)
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema that refuses unknown fields, as the API
    server's strict field validation (kubectl --validate=strict) does: every object with
    declared properties and no `x-kubernetes-preserve-unknown-fields` gets
    additionalProperties: false; `nullable` becomes a null type."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def validate(doc: Doc, version: str, crds: Dict[Tuple[str, str], Doc]) -> None:
    """Raises with the field path when `doc` is not a valid object of Kubernetes `version`."""
    key = (doc["apiVersion"], doc["kind"])
    if key not in crds:
        kv_utils.validate(doc, version, strict=True)
        return
    jsonschema.validate(doc, crds[key], cls=jsonschema.Draft7Validator)
    # A CRD's schema leaves metadata open; the API server checks it as ObjectMeta. The same
    # ObjectMeta schema, strict, is reached through an object that has nothing else.
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kv_utils.validate(probe, version, strict=True)


def api_objects(deployments: Path) -> List[Tuple[str, Doc]]:
    """(file, object) for every document of every manifest that the API server would get; a
    kustomize patch is not one, the object it makes is (as `dra/<patch> (rendered)`)."""
    patches = set(patch_files(deployments))
    out = [
        (str(path.relative_to(deployments)), doc)
        for path in sorted(deployments.rglob("*.yaml"))
        if path.resolve() not in patches
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None and (doc.get("apiVersion"), doc.get("kind")) not in CLIENT_SIDE
    ]
    docs, comp = render(deployments, DRA_DIR)
    for p in comp.get("patches", []):
        target = p["target"]
        (made,) = (
            d
            for d in docs
            if (d["kind"], d["metadata"]["name"]) == (target["kind"], target["name"])
        )
        out.append((f"{DRA_DIR}/{p['path']} (rendered)", made))
    return out


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_every_manifest_validates_strictly(deployments: Path, repo_root: Path, which: str) -> None:
    supported = [kv_utils.major_minor(v) for v in kv_utils.all_versions()]
    for page in ("operator-guide.md", "dra-operator.md"):
        claimed = claimed_versions(repo_root, page)[0 if which == "oldest" else 1]
        assert claimed in supported, (
            f"docs/{page} claims Kubernetes {claimed}, but kubernetes-validate "
            f"{kubernetes_validate.__version__} has schemas for {supported[0]}..{supported[-1]} "
            "only: pin a kubernetes-validate that has it (3rdparty/python/test-requirements.txt)"
        )
    crds = crd_schemas()
    objects = api_objects(deployments)
    kinds = {doc["kind"] for _, doc in objects}
    assert {"DaemonSet", "ConfigMap", "Pod", "NetworkAttachmentDefinition", "PodMonitor"} <= kinds
    assert {"DeviceClass", "ResourceClaimTemplate", "ClusterRole", "ServiceAccount"} <= kinds
    failures = []
    for where, doc in objects:
        oldest, newest = versions_for(where, repo_root)
        version = oldest if which == "oldest" else newest
        try:
            validate(doc, version, crds)
        except (jsonschema.ValidationError, kv_utils.SchemaNotFoundError) as e:
            path = ".".join(str(p) for p in getattr(e, "path", []))
            failures.append(
                f"{where} ({doc['kind']}, Kubernetes {version}) {path}: {getattr(e, 'message', e)}"
            )
    assert not failures, "not valid:\n" + "\n".join(failures)


def test_dra_objects_need_what_the_dra_guide_claims(deployments: Path, repo_root: Path) -> None:
    """The DRA guide's oldest version is no lower than the API: a minor before it has no
    resource.k8s.io/v1 (the validation above would not notice a claim that is too old)."""
    oldest, _ = claimed_versions(repo_root, "dra-operator.md")
    major, minor = oldest.split(".")
    before = f"{major}.{int(minor) - 1}"
    dc = next(d for w, d in api_objects(deployments) if d["kind"] == "DeviceClass")
    with pytest.raises(kv_utils.SchemaNotFoundError):
        kv_utils.validate(dc, before, strict=True)


def test_a_crd_schema_is_shipped_for_every_custom_resource(deployments: Path) -> None:
    crds = crd_schemas()
    builtin = (
        "apps/v1",
        "v1",
        "rbac.authorization.k8s.io/v1",
        "admissionregistration.k8s.io/v1",
        "resource.k8s.io/v1",
    )
    for where, doc in api_objects(deployments):
        key = (doc["apiVersion"], doc["kind"])
        assert key[0] in builtin or key in crds, f"{where}: no CRD for {key} in tests/deploy/crds"


@pytest.mark.parametrize(
    "kind, path, mistake",
    [
        # A misspelt field, a wrong type, a misspelt field in a CRD's spec and in its metadata.
        ("DaemonSet", ["spec", "template", "spec"], {"hostNetwrok": True}),
        ("DaemonSet", ["spec", "template", "spec"], {"terminationGracePeriodSeconds": "30"}),
        ("PodMonitor", ["spec", "podMetricsEndpoints", 0], {"intervall": "30s"}),
        ("NetworkAttachmentDefinition", ["spec"], {"configs": "{}"}),
        ("NetworkAttachmentDefinition", ["metadata"], {"annotation": {}}),
        # The DRA component's objects, against the DRA guide's versions.
        ("DeviceClass", ["spec"], {"extendedResourceNmae": "kernel.org/virt"}),
        ("ResourceClaimTemplate", ["spec", "spec", "devices"], {"request": []}),
        ("ClusterRole", ["rules", 0], {"verb": ["get"]}),
        (
            "dra/daemonset-dra.patch.yaml (rendered)",
            ["spec", "template", "spec"],
            {"serviceAccount_name": "x"},
        ),
    ],
)
def test_validation_refuses_what_kubectl_strict_would(
    deployments: Path, repo_root: Path, kind: str, path: List[Any], mistake: Doc
) -> None:
    # The check above can fail: the same objects with one mistake each do not validate.
    crds = crd_schemas()
    objects = api_objects(deployments)
    # `kind` names a kind (the base's object of it when the component has one too) or a file.
    found = [(w, d) for w, d in objects if w == kind]
    found = found or [(w, d) for w, d in objects if d["kind"] == kind]
    if len(found) > 1:
        found = [(w, d) for w, d in found if Path(w).parts[0] != DRA_DIR]
    ((where_file, doc),) = found
    doc = copy.deepcopy(doc)
    target = doc
    for step in path:
        target = target[step]
    target.update(mistake)
    for version in versions_for(where_file, repo_root):
        with pytest.raises(jsonschema.ValidationError) as caught:
            validate(doc, version, crds)
        (field,) = mistake
        where = [str(p) for p in caught.value.absolute_path]
        assert field in caught.value.message or field in where, (version, caught.value)
