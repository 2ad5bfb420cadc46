"""The mark ehost-device leaves on a NIC it plumbed: its link alias (IFLA_IFALIAS).

The alias travels with the link between namespaces and survives a namespace's death, so what
DEL needs to give a NIC back (its host name, PCI address, original MTU and MAC) never depends
on a file that can be lost. Format (one line, at most 255 bytes):

    virtdp/v1 host=<ifname> pci=<bdf> [mtu=<int>] [mac=<aa:bb:..>] [down=1]
              [pod=<pod uid> claim=<claim uid> att=<CNI_IFNAME>]

`down=1` records that the NIC was administratively down on the host before ADD. A NIC taken by
its DRA claim (the network config named no device) also records whose it is: the pod, the claim,
and the attachment's CNI_IFNAME (the NIC's own name through a NAD, the cluster network's
interface when chained), so that DEL finds every NIC of one attachment, in the pod or back on
the host after the pod's namespace died. Unknown keys are ignored: older readers still decode.
Stdlib only: on ehost-device's start path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PREFIX = "virtdp/v1"
MAX_BYTES = 255  # IFALIASZ (256) less the terminating NUL


@dataclass(frozen=True)
class Mark:
    host_ifname: str
    pci_address: str
    mtu: Optional[int] = None  # original MTU, when ADD changed it
    mac: Optional[str] = None  # original MAC, when ADD changed it
    was_down: bool = False
    pod: Optional[str] = None  # K8S_POD_UID of the pod the NIC was claimed for
    claim: Optional[str] = None  # the DRA claim's UID
    attachment: Optional[str] = None  # CNI_IFNAME of the ADD that took it by claim

    def encode(self) -> str:
        parts = [PREFIX, f"host={self.host_ifname}", f"pci={self.pci_address}"]
        if self.mtu is not None:
            parts.append(f"mtu={self.mtu}")
        if self.mac is not None:
            parts.append(f"mac={self.mac}")
        if self.was_down:
            parts.append("down=1")
        for key, value in (("pod", self.pod), ("claim", self.claim), ("att", self.attachment)):
            if value is not None:
                parts.append(f"{key}={value}")
        return " ".join(parts)


def decode(alias: Optional[str]) -> Optional[Mark]:
    """The mark in `alias`, or None when the alias is not ours (or is damaged)."""
    if not alias or not alias.startswith(PREFIX + " "):
        return None
    fields = {}
    for part in alias.split()[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            return None
        fields[key] = value
    if "host" not in fields or "pci" not in fields:
        return None
    try:
        mtu = int(fields["mtu"]) if "mtu" in fields else None
    except ValueError:
        return None
    return Mark(
        host_ifname=fields["host"],
        pci_address=fields["pci"],
        mtu=mtu,
        mac=fields.get("mac"),
        was_down=fields.get("down") == "1",
        pod=fields.get("pod") or None,
        claim=fields.get("claim") or None,
        attachment=fields.get("att") or None,
    )
