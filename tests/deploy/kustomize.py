"""What `kubectl apply -k` makes of deployments/ with a component enabled, for the checks (CI has
no kubectl): the base kustomization's resources, the component's resources, and the component's
strategic merge patches applied to their targets, the way kustomize applies them to a pod
template (lists with a patch merge key in the Kubernetes types merge by it: containers, env,
volumes by `name`, volumeMounts by `mountPath`; other lists, `args` among them, are replaced;
maps merge; a null deletes). Only what deployments/ uses is understood; anything else fails."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml

Doc = Dict[str, Any]
COMPONENT = ("kustomize.config.k8s.io/v1alpha1", "Component")
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
# Lists of the pod template that merge by a key (the Go types' patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def load(path: Path) -> List[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(directory: Path) -> Doc:
    (doc,) = load(directory / "kustomization.yaml")
    return doc


def patch_files(deployments: Path) -> List[Path]:
    """Every patch a kustomization or component under deployments/ names (not objects)."""
    out = []
    for kpath in sorted(deployments.rglob("kustomization.yaml")):
        for p in kustomization(kpath.parent).get("patches", []):
            out.append((kpath.parent / p["path"]).resolve())
    return out


def merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = copy.deepcopy(base)
        new = []
        for item in patch:
            at = next((i for i, x in enumerate(out) if x.get(mk) == item[mk]), None)
            if at is None:
                new.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item)
        return new + out  # kustomize puts the new items first, in the patch's order
    return copy.deepcopy(patch)


def render(deployments: Path, component: str) -> Tuple[List[Doc], Doc]:
    """(objects, the component's kustomization) of the base with `component` enabled."""
    base = kustomization(deployments)
    comp_dir = deployments / component
    comp = kustomization(comp_dir)
    assert (comp["apiVersion"], comp["kind"]) == COMPONENT, f"{component}: not a Component"
    docs: List[Doc] = []
    for res in base["resources"]:
        docs += load(deployments / res)
    for res in comp.get("resources", []):
        docs += load(comp_dir / res)
    for p in comp.get("patches", []):
        (patch,) = load(comp_dir / p["path"])
        target = p.get("target") or {}
        kind = target.get("kind", patch["kind"])
        name = target.get("name", patch["metadata"]["name"])
        hits = [
            i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name
        ]
        assert (
            len(hits) == 1
        ), f"{component}: patch {p['path']} targets {kind}/{name}: {len(hits)} found"
        docs[hits[0]] = merge(docs[hits[0]], patch)
    return docs, comp
