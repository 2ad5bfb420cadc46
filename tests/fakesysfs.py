"""The one place tests fake what this machine cannot have: a virtio PCI tree in sysfs.

`FakeSysfs(root)` lays out the same files and relative symlinks the kernel shows under /sys
(see ../shared/REFERENCE.md, "Kernel and sysfs"): the PCI function under its root port or
bridge, `virtio<N>` below it, `net/<ifname>` below that, and the bus and class links. The netdev
names it records are the names of real links (veth ends) the test made, so virtcore reads PCI
facts from here and link state from the kernel.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import pytest

VIRTIO_VENDOR = "0x1af4"
LEGACY, MODERN = "0x1000", "0x1041"


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(target, link.parent), link)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


class FakeSysfs:
    """A fake /sys tree rooted at `root` (pass `str(root)` as `--sysfs-root`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._next_virtio = 0
        for d in (
            "bus/pci/devices",
            "bus/virtio/devices",
            "class/net",
            "bus/pci/drivers/virtio-pci",
            "bus/virtio/drivers/virtio_net",
            "devices",
        ):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.root)

    # -- building --------------------------------------------------------------------------
    def function_dir(self, pci_address: str) -> Path:
        return (self.root / "bus/pci/devices" / pci_address).resolve()

    def add_virtio_nic(
        self,
        pci_address: str,
        ifname: Optional[str] = None,
        *,
        parents: Iterable[str] = ("pci0000:00",),
        legacy: bool = False,
        numa_node: int = -1,
        virtio_index: Optional[int] = None,
        mac: str = "52:54:00:00:00:01",
        mtu: int = 1500,
        driver: Optional[str] = "virtio_net",
        pci_driver: Optional[str] = "virtio-pci",
    ) -> str:
        """Add a virtio-net PCI function; `parents` are the path segments above it, e.g.
        ("pci0000:00", "0000:00:1c.0") for a q35 root port. Returns the virtio device name."""
        if virtio_index is None:
            virtio_index = self._next_virtio
        self._next_virtio = max(self._next_virtio, virtio_index + 1)
        fdir = self.root / "devices" / Path(*parents) / pci_address
        _write(fdir / "vendor", VIRTIO_VENDOR)
        _write(fdir / "device", LEGACY if legacy else MODERN)
        _write(fdir / "class", "0x020000")
        _write(fdir / "subsystem_vendor", VIRTIO_VENDOR)
        _write(fdir / "subsystem_device", "0x0001" if legacy else "0x1100")
        _write(fdir / "numa_node", str(numa_node))
        if pci_driver:
            _symlink(fdir / "driver", self.root / "bus/pci/drivers" / pci_driver)
        _symlink(self.root / "bus/pci/devices" / pci_address, fdir)
        vname = f"virtio{virtio_index}"
        vdir = fdir / vname
        _write(vdir / "device", "0x0001")
        _write(vdir / "vendor", VIRTIO_VENDOR)
        if driver:
            (self.root / "bus/virtio/drivers" / driver).mkdir(parents=True, exist_ok=True)
            _symlink(vdir / "driver", self.root / "bus/virtio/drivers" / driver)
        _symlink(self.root / "bus/virtio/devices" / vname, vdir)
        if ifname:
            self.add_netdev(pci_address, ifname, mac=mac, mtu=mtu)
        return vname

    def add_netdev(
        self, pci_address: str, ifname: str, *, mac: str = "52:54:00:00:00:01", mtu: int = 1500
    ) -> None:
        vdir = self._virtio_dir(pci_address)
        ndir = vdir / "net" / ifname
        _write(ndir / "address", mac)
        _write(ndir / "mtu", str(mtu))
        _write(ndir / "operstate", "up")
        _write(ndir / "carrier", "1")
        _symlink(self.root / "class/net" / ifname, ndir)

    def add_non_virtio_nic(
        self,
        pci_address: str,
        ifname: str,
        *,
        vendor: str = "0x8086",
        device: str = "0x100e",
        driver: str = "e1000",
    ) -> None:
        fdir = self.root / "devices/pci0000:00" / pci_address
        _write(fdir / "vendor", vendor)
        _write(fdir / "device", device)
        _write(fdir / "class", "0x020000")
        _write(fdir / "numa_node", "-1")
        _symlink(fdir / "driver", self.root / "bus/pci/drivers" / driver)
        _symlink(self.root / "bus/pci/devices" / pci_address, fdir)
        ndir = fdir / "net" / ifname
        _write(ndir / "address", "52:54:00:ff:ff:ff")
        _symlink(self.root / "class/net" / ifname, ndir)

    def add_pci_bridge(
        self,
        pci_address: str,
        *,
        parents: Iterable[str] = ("pci0000:00",),
        vendor: str = "0x8086",
        device: str = "0x29c0",
        pci_class: str = "0x060400",
    ) -> Path:
        """A PCI-to-PCI bridge or PCIe root port (class 0x0604) as its own PCI function, so the
        functions behind it sit one path level further down. Returns its directory."""
        fdir = self.root / "devices" / Path(*parents) / pci_address
        _write(fdir / "vendor", vendor)
        _write(fdir / "device", device)
        _write(fdir / "class", pci_class)
        _write(fdir / "numa_node", "-1")
        _symlink(fdir / "driver", self.root / "bus/pci/drivers/pcieport")
        _symlink(self.root / "bus/pci/devices" / pci_address, fdir)
        return fdir

    def add_virtual_netdev(self, ifname: str) -> None:
        ndir = self.root / "devices/virtual/net" / ifname
        ndir.mkdir(parents=True, exist_ok=True)
        _symlink(self.root / "class/net" / ifname, ndir)

    # -- changing --------------------------------------------------------------------------
    def _virtio_dir(self, pci_address: str) -> Path:
        fdir = self.function_dir(pci_address)
        vnames = sorted(p for p in fdir.glob("virtio*") if p.is_dir())
        if not vnames:
            raise LookupError(f"{pci_address} has no virtio device in the fake tree")
        return vnames[0]

    def move_netdev_away(self, pci_address: str) -> None:
        """What the host's sysfs shows once the NIC's netdev is in another namespace."""
        vdir = self._virtio_dir(pci_address)
        for ndir in (vdir / "net").glob("*"):
            link = self.root / "class/net" / ndir.name
            if link.is_symlink():
                link.unlink()
            shutil.rmtree(ndir)

    def rename_netdev(self, pci_address: str, ifname: str) -> None:
        """The NIC's netdev now has another name (e.g. the kernel's `devN` after a namespace
        died with the NIC inside and the old name was taken)."""
        vdir = self._virtio_dir(pci_address)
        old = next((vdir / "net").glob("*"), None)
        mac, mtu = "52:54:00:00:00:01", 1500
        if old is not None:
            mac = (old / "address").read_text().strip()
            mtu = int((old / "mtu").read_text().strip())
        self.move_netdev_away(pci_address)
        self.add_netdev(pci_address, ifname, mac=mac, mtu=mtu)

    def unbind_driver(self, pci_address: str) -> None:
        """virtio_net unbound: the virtio device stays, its driver link and netdev go."""
        self.move_netdev_away(pci_address)
        link = self._virtio_dir(pci_address) / "driver"
        if link.is_symlink():
            link.unlink()

    def bind_driver(self, pci_address: str, ifname: str, driver: str = "virtio_net") -> None:
        vdir = self._virtio_dir(pci_address)
        _symlink(vdir / "driver", self.root / "bus/virtio/drivers" / driver)
        self.add_netdev(pci_address, ifname)

    def remove_nic(self, pci_address: str) -> None:
        """Hot-unplug: the function and everything below it disappear."""
        fdir = self.function_dir(pci_address)
        for vdir in fdir.glob("virtio*"):
            link = self.root / "bus/virtio/devices" / vdir.name
            if link.is_symlink():
                link.unlink()
            for ndir in (vdir / "net").glob("*"):
                clink = self.root / "class/net" / ndir.name
                if clink.is_symlink():
                    clink.unlink()
        (self.root / "bus/pci/devices" / pci_address).unlink()
        shutil.rmtree(fdir)

    def break_pci_link(self, pci_address: str) -> None:
        """The bus link points nowhere (a tree captured half-way, or a racing unplug)."""
        link = self.root / "bus/pci/devices" / pci_address
        if link.is_symlink():
            link.unlink()
        os.symlink("../../../devices/pci0000:00/gone-" + pci_address, link)

    def remove_attribute(self, pci_address: str, name: str) -> None:
        (self.function_dir(pci_address) / name).unlink()

    def make_unreadable(self, pci_address: str, name: str) -> None:
        """Root reads mode-000 files, so replace the attribute with a directory: reading fails."""
        path = self.function_dir(pci_address) / name
        path.unlink()
        path.mkdir()


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")
