"""The API side of DRA: the test API server, a client for it (the official `kubernetes` client
through virtcore.kubeapi, as the daemon uses it) and DRA devices as the inventory makes them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
from testapiserver import TestApiServer

from virtcore import claims, kubeapi
from virtdp_serve.inventory import DraDevice

NODE = "node-a"
DRIVER = "virt.kernel.org"


def pci(i: int) -> str:
    """A distinct PCI address per index: 0000:01:00.0, 0000:01:01.0, ..."""
    return f"0000:{1 + i // 32:02x}:{i % 32:02x}.0"


def dra(
    i: int,
    *,
    problem: Optional[str] = None,
    ifname: Optional[str] = "auto",
    mac: Optional[str] = "auto",
    pool: str = "kernel.org/virt",
    numa: Optional[int] = 0,
) -> DraDevice:
    address = pci(i)
    return DraDevice(
        name=claims.device_name(address),
        pci_address=address,
        pool=pool,
        numa_node=numa,
        mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}" if mac == "auto" else mac,
        ifname=f"ens{i + 4}" if ifname == "auto" else ifname,
        vendor="0x1af4",
        device_id="0x1041",
        pcie_root="pci0000:00",
        problem=problem,
    )


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture
def api() -> Iterator[TestApiServer]:
    with TestApiServer(bookmark_interval=0.2) as server:
        server.create("nodes", {"metadata": {"name": NODE}})
        yield server


@pytest.fixture
def kube(api: TestApiServer, tmp_path: Path) -> Iterator[kubeapi.Kube]:
    k = kubeapi.connect(api.kubeconfig(str(tmp_path / "kubeconfig")), timeout=(2.0, 5.0))
    yield k
    k.close()
