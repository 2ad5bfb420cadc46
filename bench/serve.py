"""virtdp-serve benchmarks, by hand (root): `build-support/devtest` env, then

    PYTHONPATH=... .venv/bin/python bench/serve.py [--flaps 100] [--restarts 20] [--nics 256]

Runs the daemon as shipped inside a fresh network namespace against the test kubelet and
prints p50/p99 of: carrier loss -> Unhealthy seen by the kubelet, kubelet restart -> plugin
registered again, Allocate round trip at the kubelet; and the daemon's resident memory with
`--nics` NICs in 4 pools. Everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests", "serve"), os.path.join(HERE, "..", "tests")]

from conftest import ServeLab  # noqa: E402  (the test bench of tests/serve)

RES = "kernel.org/virt"


def pct(values: List[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def report(name: str, values: List[float], target: str = "") -> None:
    ms = [v * 1000 for v in values]
    print(
        f"{name:<44} n={len(ms):<4} p50={pct(ms, 50):7.1f} ms  p99={pct(ms, 99):7.1f} ms  "
        f"max={max(ms):7.1f} ms  mean={statistics.mean(ms):6.1f} ms {target}"
    )


def _flap(lab: ServeLab, plugged: bool) -> float:
    t0 = time.monotonic()
    lab.cable("ens10", plugged)
    want = "Healthy" if plugged else "Unhealthy"
    lab.kubelet.wait_health(RES, {"0000:00:0a.0": want}, timeout=5)
    return time.monotonic() - t0


def bench_flaps(flaps: int) -> None:
    lab = ServeLab()
    try:
        lab.add_nic("0000:00:0a.0", "ens10")
        lab.kubelet.start()
        lab.start()
        lab.kubelet.wait_registered(RES)
        lab.kubelet.wait_health(RES, {"0000:00:0a.0": "Healthy"})
        down: List[float] = []
        up: List[float] = []
        # Back to back: the case where the kernel announces carrier loss late (see linkwatch).
        for _ in range(flaps):
            down.append(_flap(lab, False))
            up.append(_flap(lab, True))
        report("carrier loss -> Unhealthy at kubelet", down, "(target p99 < 200 ms)")
        report("carrier back -> Healthy at kubelet", up)

        times: List[float] = []
        for _ in range(300):
            t0 = time.monotonic()
            lab.kubelet.raw_allocate(RES, [["0000:00:0a.0"]])
            times.append(time.monotonic() - t0)
        report("Allocate round trip (1 device)", times)
    finally:
        lab.close()


def bench_restarts(restarts: int) -> None:
    lab = ServeLab()
    try:
        lab.add_nic("0000:00:0a.0", "ens10")
        lab.kubelet.start()
        lab.start()
        lab.kubelet.wait_registered(RES)
        reg: List[float] = []
        listed: List[float] = []
        for _ in range(restarts):
            n = len(lab.kubelet.registrations)
            t0 = lab.kubelet.restart()
            lab.kubelet.wait(lambda n=n: len(lab.kubelet.registrations) > n, 5, "Register")
            reg.append(lab.kubelet.registrations[n][0] - t0)
            lab.kubelet.wait_registered(RES, timeout=5)
            listed.append(time.monotonic() - t0)
            time.sleep(0.2)
        report("kubelet restart -> Register received", reg, "(target < 1 s)")
        report("kubelet restart -> registered and listed", listed)
    finally:
        lab.close()


def bench_memory(nics: int) -> None:
    lab = ServeLab()
    try:
        batch = []
        addrs = []
        for i in range(nics):
            bus, dev = divmod(i, 32)
            addr = f"0000:{bus + 1:02x}:{dev:02x}.0"
            addrs.append(addr)
            batch.append(
                f"link add t{i} type veth peer name wt{i} netns {lab.wire.name}\n"
                f"link set t{i} up\n"
            )
        subprocess.run(
            ["ip", "-n", lab.node.name, "-batch", "-"], input="".join(batch), text=True, check=True
        )
        subprocess.run(
            ["ip", "-n", lab.wire.name, "-batch", "-"],
            input="".join(f"link set wt{i} up\n" for i in range(nics)),
            text=True,
            check=True,
        )
        for i, addr in enumerate(addrs):
            lab.sysfs.add_virtio_nic(addr, f"t{i}", numa_node=i % 2)
        quarter = nics // 4
        pools = []
        for p in range(4):
            sel = ", ".join(f'"{a}"' for a in addrs[p * quarter : (p + 1) * quarter])
            pools.append(
                f"  - resourceName: example.com/pool{p}\n    selectors: {{pciAddresses: [{sel}]}}\n"
            )
        lab.write_config("pools:\n" + "".join(pools))
        lab.kubelet.start()
        t0 = time.monotonic()
        proc = lab.start(config=True)
        for p in range(4):
            lab.kubelet.wait_registered(f"example.com/pool{p}", timeout=60)
            lab.kubelet.wait(
                lambda p=p: len(lab.kubelet.devices.get(f"example.com/pool{p}", {})) == quarter,
                60,
                "all devices",
            )
        ready = time.monotonic() - t0
        time.sleep(5)  # a few periodic rescans
        rss = hwm = 0
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        print(
            f"{nics} NICs in 4 pools: all listed {ready:.2f}s after start; daemon RSS "
            f"{rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB), CPU {cpu:.2f}s in "
            f"{time.monotonic() - t0:.1f}s"
        )
        t0 = time.monotonic()
        subprocess.run(["ip", "-n", lab.wire.name, "link", "set", "wt1", "down"], check=True)
        lab.kubelet.wait(
            lambda: lab.kubelet.devices["example.com/pool0"][addrs[1]].health == "Unhealthy",
            10,
            "unhealthy",
        )
        print(
            f"  carrier loss -> Unhealthy with {nics} NICs: {(time.monotonic() - t0) * 1000:.1f} ms"
        )
    finally:
        lab.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flaps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--nics", type=int, default=256)
    args = ap.parse_args()
    bench_flaps(args.flaps)
    bench_restarts(args.restarts)
    bench_memory(args.nics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
