"""The mark ehost-device leaves on a NIC it plumbed: its link alias (IFLA_IFALIAS).

The alias travels with the link between namespaces and survives a namespace's death, so what
DEL needs to give a NIC back (its host name, PCI address, original MTU and MAC) never depends
on a file that can be lost. Format (one line, at most 255 bytes):

    virtdp/v1 host=<ifname> pci=<bdf> [mtu=<int>] [mac=<aa:bb:..>] [down=1]

`down=1` records that the NIC was administratively down on the host before ADD.
Stdlib only: on ehost-device's start path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PREFIX = "virtdp/v1"


@dataclass(frozen=True)
class Mark:
    host_ifname: str
    pci_address: str
    mtu: Optional[int] = None  # original MTU, when ADD changed it
    mac: Optional[str] = None  # original MAC, when ADD changed it
    was_down: bool = False

    def encode(self) -> str:
        parts = [PREFIX, f"host={self.host_ifname}", f"pci={self.pci_address}"]
        if self.mtu is not None:
            parts.append(f"mtu={self.mtu}")
        if self.mac is not None:
            parts.append(f"mac={self.mac}")
        if self.was_down:
            parts.append("down=1")
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
    )
