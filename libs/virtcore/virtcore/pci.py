"""PCI addresses: parsing, validation and normalisation (the device ID everywhere in virtdp)."""

from __future__ import annotations

import re

# domain:bus:device.function, e.g. 0000:00:0a.0. The short form bus:device.function gets the
# default domain. Device is 5 bits (00-1f), function 3 bits (0-7).
_FULL = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_SHORT = re.compile(r"^([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


class PCIAddressError(ValueError):
    """A string that is not a PCI address."""


def normalize(text: str) -> str:
    """Return the canonical lower-case `dddd:bb:dd.f` form, or raise PCIAddressError."""
    if not isinstance(text, str):
        raise PCIAddressError(f"PCI address must be a string, got {type(text).__name__}")
    m = _FULL.match(text)
    if m:
        return f"{m.group(1)}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()
    m = _SHORT.match(text)
    if m:
        return f"0000:{m.group(1)}:{m.group(2)}.{m.group(3)}".lower()
    raise PCIAddressError(
        f"{text!r} is not a PCI address (expected domain:bus:device.function, e.g. 0000:00:0a.0)"
    )


def is_pci_address(text: object) -> bool:
    return isinstance(text, str) and bool(_FULL.match(text) or _SHORT.match(text))
