"""DRA claim records for the CNI and runtime tests: what virtdp-serve writes when the kubelet
prepares a claim (`claims.json`, through virtcore.claims, the daemon's own writer), and what
ehost-device leaves per plumbed NIC (`status/*.json`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from virtcore import claims

DRIVER = claims.DEFAULT_DRIVER
NODE = "node-a"


def new_uid() -> str:
    return str(uuid.uuid4())


def device(
    pci: str, request: str = "nic", interface_name: Optional[str] = None
) -> claims.ClaimedDevice:
    return claims.ClaimedDevice(
        request=request,
        pool=NODE,
        device=claims.device_name(pci),
        pci_address=pci,
        interface_name=interface_name,
    )


def claim(
    name: str,
    pod_uid: str,
    *devices: claims.ClaimedDevice,
    namespace: str = "default",
    uid: Optional[str] = None,
    pod_name: str = "p",
    more_pods: Sequence[str] = (),
) -> claims.PreparedClaim:
    pods = [claims.PodRef(uid=pod_uid, namespace=namespace, name=pod_name)]
    pods += [claims.PodRef(uid=u, namespace=namespace, name=f"p-{u[:6]}") for u in more_pods]
    return claims.PreparedClaim(
        uid=uid or new_uid(),
        namespace=namespace,
        name=name,
        driver=DRIVER,
        pods=tuple(pods),
        devices=tuple(devices),
    )


def write(directory: os.PathLike[str] | str, *prepared: claims.PreparedClaim) -> Path:
    """Replace the record in `directory` with `prepared` (as the daemon does)."""
    os.makedirs(directory, exist_ok=True)
    return Path(claims.save(os.fspath(directory), list(prepared), driver=DRIVER, node=NODE))


def statuses(directory: os.PathLike[str] | str) -> List[claims.DeviceStatus]:
    return claims.load_statuses(os.fspath(directory))


def status_files(directory: os.PathLike[str] | str) -> List[str]:
    d = Path(directory) / claims.STATUS_DIR
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def cni_args(pod_uid: Optional[str], **more: str) -> Dict[str, str]:
    """CNI_ARGS as containerd 1.6 passes them (its toCNILabels), for `pod_uid`."""
    parts = {"K8S_POD_INFRA_CONTAINER_ID": "ctr1", "IgnoreUnknown": "1"}
    if pod_uid is not None:
        parts["K8S_POD_UID"] = pod_uid
    parts.update({"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "p"})
    parts.update(more)
    return {"CNI_ARGS": ";".join(f"{k}={v}" for k, v in parts.items())}
