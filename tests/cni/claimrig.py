"""The claim tests' helpers: three NICs (the `nics` fixture in conftest), and the node's default
conflist (the cluster network, then ehost-device by claim)."""

from __future__ import annotations

from typing import Any

from cnilist import ConfList

from virtcore import alias

A, B, C = "0000:00:05.0", "0000:00:06.0", "0000:00:07.0"


def home(rig, nics, *pcis) -> bool:
    return all(rig.has_link(nics[p][0]) and rig.state(nics[p][0]) == nics[p][1] for p in pcis)


def mark(rig, name, pod) -> alias.Mark:
    m = alias.decode(rig.state(name, pod)["alias"])
    assert m is not None, name
    return m


def cluster(rig: Any, version: str = "1.0.0", **ours: Any) -> ConfList:
    """The node's default conflist: the cluster network (ptp, host-local 192.0.2.0/24), then
    ehost-device by claim (host-local 198.51.100.0/24 from the rig)."""
    conflist = {
        "cniVersion": version,
        "name": "vnet",
        "plugins": [
            {
                "type": "ptp",
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(rig.tmp / "ipam-cluster"),
                    "ranges": [[{"subnet": "192.0.2.0/24"}]],
                },
            },
            {"type": "ehost-device", "ipam": rig.host_local(), **ours},
        ],
    }
    return ConfList(conflist, rig.cni)


def cluster_leases(rig):
    d = rig.tmp / "ipam-cluster" / "vnet"
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name != "lock" and "last_" not in p.name)
