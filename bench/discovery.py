"""Discovery time on fake sysfs trees of 16, 256 and 4096 virtio NICs (run by hand).

    build-support/devtest --version >/dev/null   # makes the venv once
    PYTHONPATH=libs/virtcore:tests .venv/bin/python bench/discovery.py [--repeat N] [SIZES...]

Trees are built by tests/fakesysfs.py in a temporary directory (removed afterwards); half the
NICs sit behind PCIe root ports, every NIC names a netdev. Netlink is read once per discovery in
the current namespace (read only). Prints, per size, the median of `--repeat` runs of
`discovery.discover` and of its sysfs part alone, the cost per NIC, and the growth against the
smallest tree (linear growth keeps the per-NIC cost flat).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

from fakesysfs import FakeSysfs

from virtcore import discovery, sysfs


def build(root: Path, count: int) -> FakeSysfs:
    tree = FakeSysfs(root)
    ports = set()
    for i in range(count):
        bus, slot = divmod(i, 32 * 8)
        dev, fn = divmod(slot, 8)
        addr = f"0000:{bus + 1:02x}:{dev:02x}.{fn}"
        if i % 2:
            port = f"0000:00:{(bus % 24) + 4:02x}.0"
            if port not in ports:
                tree.add_pci_bridge(port)
                ports.add(port)
            parents: tuple = ("pci0000:00", port)
        else:
            parents = ("pci0000:00",)
        tree.add_virtio_nic(addr, f"bench{i}", parents=parents, legacy=bool(i % 3 == 0))
    return tree


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm the dentry and page caches
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[16, 256, 4096])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    print(
        f"{'NICs':>6} {'build s':>8} {'discover ms':>12} {'sysfs ms':>9} "
        f"{'us/NIC':>8} {'growth':>7} {'size x':>7}"
    )
    base = None
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="virtdp-bench-") as tmp:
            t = time.perf_counter()
            tree = build(Path(tmp) / "sys", n)
            built = time.perf_counter() - t
            root = str(tree)
            found = discovery.discover(root)
            assert len(found) == n, (len(found), n)
            total = median_seconds(functools.partial(discovery.discover, root), args.repeat)
            scan = median_seconds(functools.partial(sysfs.scan, root), args.repeat)
        if base is None:
            base = (n, total)
        growth = total / base[1]
        print(
            f"{n:>6} {built:>8.2f} {total * 1e3:>12.1f} {scan * 1e3:>9.1f} "
            f"{total / n * 1e6:>8.1f} {growth:>7.1f} {n / base[0]:>7.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
