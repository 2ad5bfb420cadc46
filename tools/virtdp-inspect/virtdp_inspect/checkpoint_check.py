"""Sanity checks of the kubelet checkpoint against this node: device IDs no discovered NIC
matches, devices held by two pods, allocations of devices the kubelet no longer registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from virtcore import checkpoint, discovery, pci

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    severity: str  # ERROR or WARNING
    resource: Optional[str]
    device_id: Optional[str]
    message: str


def nic_resources(ck: checkpoint.Checkpoint) -> List[str]:
    """Resources whose every device ID is a PCI address: virtdp's, or another PCI NIC plugin's."""
    ids: Dict[str, Set[str]] = {}
    for e in ck.entries:
        ids.setdefault(e.resource_name, set()).update(e.device_ids)
    for resource, reg in ck.registered_devices:
        ids.setdefault(resource, set()).update(reg)
    return sorted(r for r, s in ids.items() if s and all(pci.is_pci_address(i) for i in s))


def check(
    ck: checkpoint.Checkpoint,
    nics: Optional[Sequence[discovery.Nic]],
    resources: Sequence[str],
) -> List[Finding]:
    """Findings, errors first. `nics` None = discovery failed: NIC matching is skipped."""
    out: List[Finding] = []
    if ck.checksum is None:
        out.append(Finding(WARNING, None, None, "no Checksum: the kubelet will refuse this file"))
    known = {n.pci_address for n in nics} if nics is not None else None
    checked = set(resources)

    holders: Dict[Tuple[str, str], Set[str]] = {}
    for e in ck.entries:
        registered = set(ck.registered(e.resource_name))
        if e.alloc_problem:
            out.append(
                Finding(WARNING, e.resource_name, None, f"pod {e.pod_uid}: {e.alloc_problem}")
            )
        for dev_id in e.device_ids:
            holders.setdefault((e.resource_name, dev_id), set()).add(e.pod_uid)
            if dev_id not in registered:
                out.append(
                    Finding(
                        WARNING,
                        e.resource_name,
                        dev_id,
                        f"allocated to pod {e.pod_uid} container {e.container_name} but not "
                        "among the registered devices (unhealthy, or its plugin gone?)",
                    )
                )
    for (resource, dev_id), pods in sorted(holders.items()):
        if len(pods) > 1:
            out.append(
                Finding(
                    ERROR,
                    resource,
                    dev_id,
                    f"allocated to {len(pods)} pods at once: {', '.join(sorted(pods))}",
                )
            )

    if known is not None:
        seen: Set[Tuple[str, str]] = set()
        ids: List[Tuple[str, str, str]] = []
        for e in ck.entries:
            ids.extend((e.resource_name, i, "allocated") for i in e.device_ids)
        for resource, reg in ck.registered_devices:
            ids.extend((resource, i, "registered") for i in reg)
        for resource, dev_id, how in ids:
            if resource not in checked or (resource, dev_id) in seen:
                continue
            seen.add((resource, dev_id))
            if not pci.is_pci_address(dev_id):
                out.append(Finding(ERROR, resource, dev_id, f"{how} ID is not a PCI address"))
            elif pci.normalize(dev_id) not in known:
                out.append(
                    Finding(
                        ERROR,
                        resource,
                        dev_id,
                        f"{how}, but no virtio NIC on this node has this PCI address "
                        "(unplugged or renumbered?)",
                    )
                )
    out.sort(key=lambda f: (f.severity != ERROR, f.resource or "", f.device_id or ""))
    return out
